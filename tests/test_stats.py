"""``server.stats`` (``--stats-interval``): the numbers add up against what the clients did.

Every expected number is derived from the test's own traffic. A stats event is taken only once
the server has logged the work it must count (the bytes received and sent, the close), so it is
the first report that has to include everything.
"""

from __future__ import annotations

import os
from itertools import pairwise

import pytest
from chat_harness import join_many
from conftest import (
    HOST,
    Event,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    recv_exactly,
    run_cli,
    send_messages,
    usage_error,
    wait_event_count,
)

STATES = ("accepted", "handshaking", "reading", "paused", "limited", "emptied", "draining")
FAST = ("--stats-interval", "0.2")


def stats_after(server: ServerProcess, mark: int) -> Event:
    """The first server.stats event logged after the first ``mark`` events."""
    seen = -1

    def later_stats(event: Event) -> bool:
        nonlocal seen
        seen += 1
        return seen >= mark and event.get("event") == "server.stats"

    return server.wait_for(later_stats, what=f"a server.stats event after event {mark}")


def next_stats(server: ServerProcess) -> Event:
    """The first server.stats event logged after everything logged so far."""
    return stats_after(server, len(server.events()))


def assert_connections(stats: Event, **expected: int) -> None:
    by_state = stats["connections"]
    assert set(STATES) <= set(by_state), by_state
    for state in STATES:
        assert by_state[state] == expected.get(state, 0), (state, by_state)


def test_raw_counters_add_up_to_the_traffic(start_server: StartServer) -> None:
    server = start_server(*FAST, "--history", "3")
    a, b, c = server.connect_many(3)
    messages = [os.urandom(size) for size in (1, 10, 100, 1000, 4321, 7)]
    sent = sum(len(m) for m in messages)
    send_messages(server, a, messages)
    everything = b"".join(messages)
    for reader in (b, c):
        assert recv_exactly(reader.sock, sent) == everything
        server.wait_sent_to(reader, sent)

    stats = next_stats(server)
    assert stats["level"] == "info"
    assert stats["messages_in"] == len(messages)
    assert stats["messages_out"] == 2 * len(messages)
    assert stats["bytes_in"] == sent
    assert stats["bytes_out"] == 2 * sent
    assert stats["accepted"] == 3
    assert_connections(stats, reading=3)
    assert stats["queued_bytes"] == 0
    assert stats["queued_max"] == 0
    assert sum(stats["closed"].values()) == 0, stats["closed"]
    assert sum(stats["rejected"].values()) == 0, stats["rejected"]
    assert isinstance(stats["loop_turns"], int) and stats["loop_turns"] > 0
    assert 0 <= stats["select_share"] <= 1
    assert stats["lines_cut"] == 0
    assert stats["history"] == 3
    assert stats["seconds"] > 0

    # B answers once; C leaves.
    b.sock.sendall(b"reply")
    assert recv_exactly(a.sock, 5) == b"reply"
    assert recv_exactly(c.sock, 5) == b"reply"
    c.sock.close()
    assert server.wait_closed(c)["reason"] == "peer_closed"
    server.wait_sent_to(a, 5)
    after = next_stats(server)
    assert after["messages_in"] == len(messages) + 1
    assert after["messages_out"] == 2 * len(messages) + 2
    assert after["bytes_in"] == sent + 5
    assert after["bytes_out"] == 2 * sent + 10
    assert after["accepted"] == 3
    assert_connections(after, reading=2)
    assert {k: v for k, v in after["closed"].items() if v} == {"peer_closed": 1}
    assert after["history"] == 3
    assert after["loop_turns"] > stats["loop_turns"]
    assert after["seconds"] > stats["seconds"]


def test_reports_come_at_the_interval_and_an_idle_loop_is_mostly_in_select(
    start_server: StartServer,
) -> None:
    server = start_server(*FAST)
    reports = wait_event_count(server, "server.stats", 3)
    seconds = [r["seconds"] for r in reports]
    assert all(later - earlier >= 0.15 for earlier, later in pairwise(seconds)), seconds
    turns = [r["loop_turns"] for r in reports]
    assert turns == sorted(turns), turns
    for report in reports:
        assert_connections(report)
        assert report["accepted"] == report["messages_in"] == report["bytes_out"] == 0
        # Nothing to do but wait: the loop spends (nearly) all of its time in select.
        assert 0.5 < report["select_share"] <= 1, report


def test_rejected_connections_are_counted_by_reason(start_server: StartServer) -> None:
    server = start_server(*FAST, "--max-clients", "2")
    a, b = server.connect_many(2)
    extra = server.raw_connect()
    rejected = server.wait_event("connection.rejected", reason="server_full")
    assert rejected["peer"] == f"{HOST}:{extra.getsockname()[1]}"
    stats = next_stats(server)
    assert {k: v for k, v in stats["rejected"].items() if v} == {"server_full": 1}
    assert_connections(stats, reading=2)
    # A rejected client is no connection of the chat: it never closes one.
    assert sum(stats["closed"].values()) == 0, stats["closed"]
    a.sock.sendall(b"x")
    assert recv_exactly(b.sock, 1) == b"x"


def test_chat_counters_count_lines_and_every_line_sent(start_server: StartServer) -> None:
    server = start_server(*FAST, "--mode", "chat", "--history", "10")
    a, b = join_many(server, 2)
    b.expect_replay("*** user1 joined lobby\n")  # history counts as lines sent too, frame too
    from_a = [b"hello\n", b"/who\n", b"/nick alice\n"]
    from_b = [b"hi there\r\n", b"/me waves\n", b"/bogus\n"]
    a.send(b"".join(from_a))
    a.expect("*** 2 in lobby: user1, user2\n", "*** you are now alice\n")
    b.expect("<user1> hello\n", "*** user1 is now alice\n")
    b.send(b"".join(from_b))
    a.expect("<user2> hi there\n", "* user2 waves\n")
    assert b.line().startswith(b"*** unknown command /bogus")
    a.quiet()
    b.quiet()
    server.wait_received_from(a.client, len(b"".join(from_a)))
    server.wait_received_from(b.client, len(b"".join(from_b)))
    server.wait_sent_to(a.client, a.lines.received)
    server.wait_sent_to(b.client, b.lines.received)

    stats = next_stats(server)
    assert stats["messages_in"] == len(from_a) + len(from_b)  # commands are lines too
    assert stats["bytes_in"] == len(b"".join(from_a + from_b))
    # Welcome lines, history, the join notice, messages, notices, every answer to one client.
    assert stats["messages_out"] == a.lines.count + b.lines.count
    assert stats["bytes_out"] == a.lines.received + b.lines.received
    assert stats["lines_cut"] == 0
    assert stats["accepted"] == 2
    assert_connections(stats, reading=2)
    # Kept: both joins, "hello", the rename, "hi there", the action; no private answer.
    assert stats["history"] == 6


def test_chat_counts_each_long_line_cut_once(start_server: StartServer) -> None:
    server = start_server(*FAST, "--mode", "chat", "--max-line", "16")
    a, b = join_many(server, 2)
    a.send(b"x" * 40 + b"\nshort\n" + b"y" * 17 + b"\n")
    b.expect(*[f"<user1> {'x' * n}\n" for n in (16, 16, 8)], "<user1> short\n")
    b.expect(f"<user1> {'y' * 16}\n", "<user1> y\n")
    a.say("z" * 16)  # exactly the limit: not cut
    b.expect(f"<user1> {'z' * 16}\n")
    b.quiet()
    server.wait_sent_to(b.client, b.lines.received)
    assert next_stats(server)["lines_cut"] == 2


def test_stats_interval_zero_logs_no_stats(start_server: StartServer) -> None:
    quiet = start_server("--stats-interval", "0")
    ticking = start_server(*FAST)
    a, b = quiet.connect_many(2)
    a.sock.sendall(b"ping")
    assert recv_exactly(b.sock, 4) == b"ping"
    # The same time that gave the other server two reports gave this one none.
    wait_event_count(ticking, "server.stats", 2)
    assert_nothing_arrives(a.sock)
    assert quiet.stop() == 0
    assert not quiet.events("server.stats")
    assert quiet.events("server.stopped")


@pytest.mark.parametrize("value", ["-1", "often", "nan"])
def test_bad_stats_interval_exits_2_with_one_line(value: str) -> None:
    result = run_cli("--host", HOST, "--port", "0", "--stats-interval", value)
    usage_error(result, "--stats-interval")
