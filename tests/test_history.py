"""History (``--history N``, ``--history-bytes``): what a newcomer is given before live traffic.

Raw mode: every message is what one recv returned, so each one is sent only after the server
logged receiving the previous one (one send, one recv). Expectations are derived from what the
test sent: the newest messages that fit both bounds, oldest first, byte-exact.
"""

from __future__ import annotations

import os

import pytest
from chat_harness import Chatter, join
from conftest import (
    HOST,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    recv_exactly,
    recv_until_suffix,
    run_cli,
    send_messages,
    usage_error,
)


def kept(messages: list[bytes], count: int, limit: int) -> list[bytes]:
    """The newest messages, at most ``count`` of them and at most ``limit`` bytes, in order."""
    out: list[bytes] = []
    size = 0
    for message in reversed(messages):
        if len(out) == count or size + len(message) > limit:
            break
        out.append(message)
        size += len(message)
    return out[::-1]


def test_raw_newcomer_gets_exactly_the_last_n_messages_then_live_traffic(
    start_server: StartServer,
) -> None:
    server = start_server("--history", "5")
    sender, listener = server.connect_many(2)
    messages = [f"m{i}:".encode() + os.urandom(10 + 7 * i) for i in range(8)]
    send_messages(server, sender, messages)
    expected = b"".join(messages)
    assert recv_exactly(listener.sock, len(expected)) == expected  # present: live, no replay

    newcomer = server.connect()
    last_five = b"".join(messages[-5:])
    assert recv_exactly(newcomer.sock, len(last_five)) == last_five
    live = b"live \x00\xff after history"
    sender.sock.sendall(live)
    assert recv_exactly(listener.sock, len(live)) == live
    assert recv_exactly(newcomer.sock, len(live)) == live
    # The sender is never replayed its own history, nor the listener anything twice.
    assert_nothing_arrives(newcomer.sock)
    assert_nothing_arrives(listener.sock)
    assert_nothing_arrives(sender.sock)


def test_raw_history_counts_messages_from_every_sender(start_server: StartServer) -> None:
    server = start_server("--history", "3")
    a, b = server.connect_many(2)
    send_messages(server, a, [b"a1"])
    assert recv_exactly(b.sock, 2) == b"a1"
    send_messages(server, b, [b"b1-"])
    assert recv_exactly(a.sock, 3) == b"b1-"
    send_messages(server, a, [b"a2--"])
    assert recv_exactly(b.sock, 4) == b"a2--"
    send_messages(server, b, [b"b2---"])
    assert recv_exactly(a.sock, 5) == b"b2---"
    newcomer = server.connect()
    expected = b"b1-" + b"a2--" + b"b2---"
    assert recv_exactly(newcomer.sock, len(expected)) == expected
    b.sock.sendall(b"!")
    assert recv_exactly(newcomer.sock, 1) == b"!"


def test_without_history_a_newcomer_gets_only_live_traffic(server: ServerProcess) -> None:
    sender, listener = server.connect_many(2)
    send_messages(server, sender, [b"old one", b"old two"])
    assert recv_exactly(listener.sock, 14) == b"old oneold two"
    newcomer = server.connect()
    sender.sock.sendall(b"new")
    assert recv_exactly(listener.sock, 3) == b"new"
    assert recv_exactly(newcomer.sock, 3) == b"new"


def test_history_bytes_drops_the_oldest_first(start_server: StartServer) -> None:
    limit = 350
    server = start_server("--history", "10", "--history-bytes", str(limit))
    sender, listener = server.connect_many(2)
    messages = [bytes([65 + i]) * (40 + 13 * i) for i in range(10)]
    send_messages(server, sender, messages)
    everything = b"".join(messages)
    assert recv_exactly(listener.sock, len(everything)) == everything

    newcomer = server.connect()
    expected = kept(messages, 10, limit)
    assert 0 < len(expected) < 10  # the byte bound, not the count, decides here
    replay = b"".join(expected)
    assert len(replay) <= limit
    assert len(replay) + len(messages[-len(expected) - 1]) > limit
    assert recv_exactly(newcomer.sock, len(replay)) == replay
    sender.sock.sendall(b"|live|")
    assert recv_exactly(newcomer.sock, 6) == b"|live|"


def test_a_newcomer_joining_during_traffic_gets_no_gap_and_no_repeat(
    start_server: StartServer,
) -> None:
    """History, then live: whenever it joins, what the newcomer gets is an unbroken tail."""
    server = start_server("--history", "4")
    sender, listener = server.connect_many(2)
    early = [f"<{i:03d}>".encode() for i in range(4)]
    send_messages(server, sender, early)
    assert recv_exactly(listener.sock, 20) == b"".join(early)
    newcomer = server.raw_connect()  # not awaited: it joins while the messages below flow
    later = [f"[{i:03d}]".encode() for i in range(60)]
    for message in later:
        sender.sock.sendall(message)
    end = b"{end}"
    sender.sock.sendall(end)
    assert recv_until_suffix(listener.sock, end) == b"".join(later) + end
    stream = recv_until_suffix(newcomer, end)
    whole = b"".join(early + later) + end
    # Recv boundaries are TCP's business, so history holds whole recvs of unknown sizes; but
    # what the newcomer got must be the tail of everything, without gap, repeat or reordering,
    # and more than the live end marker (it joined after the early messages were kept).
    assert whole.endswith(stream), stream
    assert len(stream) > len(end)


# --------------------------------------------------------------------------
# Chat mode
# --------------------------------------------------------------------------


def join_with_history(server: ServerProcess) -> tuple[Chatter, Chatter]:
    """Two chatters; the second is given the first one's join notice as history.

    A public line is kept even when nobody else was there to get it (the spec keeps "every line
    sent to everyone"; the first join had an empty audience, and a later joiner learns of it).
    """
    a = join(server)
    b = join(server, a)
    b.expect_replay("*** user1 joined lobby\n")
    return a, b


def test_chat_history_follows_the_welcome_and_holds_shared_lines_only(
    start_server: StartServer,
) -> None:
    server = start_server("--mode", "chat", "--history", "5")
    a, b = join_with_history(server)
    shared = [b"*** user1 joined lobby\n", b"*** user2 joined lobby\n"]
    a.say("one")
    b.expect("<user1> one\n")
    shared.append(b"<user1> one\n")
    b.say("/who")  # private: not kept
    b.expect("*** 2 in lobby: user1, user2\n")
    b.say("/nick bad name!")  # private refusal: not kept
    assert b.line().startswith(b"*** nick: ")
    b.say("/foo")  # private: not kept
    assert b.line().startswith(b"*** unknown command /foo")
    a.say("/me waves")
    b.expect("* user1 waves\n")
    shared.append(b"* user1 waves\n")
    b.say("/nick bob")
    b.expect("*** you are now bob\n")  # private: not kept
    a.expect("*** user2 is now bob\n")
    shared.append(b"*** user2 is now bob\n")
    b.say("two")
    a.expect("<bob> two\n")
    shared.append(b"<bob> two\n")
    d = join(server, a, b)
    shared.append(f"*** {d.name} joined lobby\n".encode())
    d.expect_replay(*kept(shared[:-1], 5, 1 << 20))  # its own arrival is not replayed to it
    d.say("/quit")
    d.expect("*** bye\n")
    a.expect(f"*** {d.name} left lobby\n")
    b.expect(f"*** {d.name} left lobby\n")
    shared.append(f"*** {d.name} left lobby\n".encode())

    c = join(server, a, b)
    assert kept(shared, 5, 1 << 20) == shared[-5:]
    c.expect_replay(*shared[-5:])
    a.say("live")
    c.expect("<user1> live\n")
    b.expect("<user1> live\n")
    c.quiet()


def test_chat_history_is_bounded_by_bytes_too(start_server: StartServer) -> None:
    server = start_server("--mode", "chat", "--history", "100", "--history-bytes", "64")
    a, b = join_with_history(server)
    shared = [b"*** user1 joined lobby\n", b"*** user2 joined lobby\n"]
    for i in range(6):
        a.say(f"line {i} " + "x" * i)
        line = f"<user1> line {i} {'x' * i}\n".encode()
        b.expect(line)
        shared.append(line)
    c: Chatter = join(server, a, b)
    expected = kept(shared, 100, 64)
    assert 0 < len(expected) < len(shared)
    c.expect_replay(*expected)
    a.say("live")
    c.expect("<user1> live\n")


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--history-bytes", "1K"], "--history-bytes"),
        (["--history", "0", "--history-bytes", "1K"], "--history-bytes"),
        (["--history", "5", "--history-bytes", "2M"], "--history-bytes"),
        (["--history", "5", "--max-queue-bytes", "1M", "--history-bytes", "257K"],
         "--history-bytes"),
        (["--history", "5", "--history-bytes", "0"], "--history-bytes"),
        (["--history", "-1"], "--history"),
        (["--history", "1000001"], "--history"),
        (["--history", "some"], "--history"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_history_option_exits_2_with_one_line_naming_it(
    args: list[str], option: str
) -> None:
    line = usage_error(run_cli("--host", HOST, "--port", "0", *args), option)
    if "--history" not in args or args[args.index("--history") + 1] == "0":
        assert "--history-bytes needs --history" in line


@pytest.mark.parametrize(
    "args",
    [
        ["--history", "1000000"],
        ["--history", "1", "--history-bytes", "1"],
        ["--history", "5", "--history-bytes", "1M"],  # exactly a quarter of the default 4M
        ["--history", "5", "--max-queue-bytes", "1M", "--history-bytes", "256K"],
        ["--history", "5", "--max-queue-bytes", "1M"],  # the default follows: 256K
    ],
    ids=" ".join,
)
def test_history_bounds_that_are_allowed(start_server: StartServer, args: list[str]) -> None:
    server = start_server(*args)
    if "--history-bytes" not in args:  # the documented default: 1M, at most a quarter
        queue = int(server.events("server.started")[0]["max_queue_bytes"])
        assert server.events("server.started")[0]["history_bytes"] == min(1 << 20, queue // 4)
    a, b = server.connect_many(2)
    a.sock.sendall(b"ok")
    assert recv_exactly(b.sock, 2) == b"ok"
