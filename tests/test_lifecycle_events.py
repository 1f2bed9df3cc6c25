"""The per-connection lifecycle in the event log: state chains, close reasons, byte counts."""

from __future__ import annotations

import socket

from conftest import (
    BACKLOG_LIMIT,
    Event,
    ServerProcess,
    StartServer,
    queue_backlog,
    recv_exactly,
    recv_until_eof,
    reset,
)

from fsmchat.lifecycle import INITIAL, State, Trigger, next_state


def state_chains(events: list[Event]) -> list[tuple[Event, list[Event]]]:
    """For every connection.accepted event, the connection.state events of that connection.

    A connection's fd may be reused after it closes, so a chain runs from its
    accepted event to the next accepted event on the same fd.
    """
    chains: list[tuple[Event, list[Event]]] = []
    open_chain: dict[int, list[Event]] = {}
    for event in events:
        name = event.get("event")
        if name == "connection.accepted":
            chain: list[Event] = []
            open_chain[int(event["fd"])] = chain
            chains.append((event, chain))
        elif name == "connection.state":
            fd = int(event["fd"])
            assert fd in open_chain, (
                f"connection.state before connection.accepted for fd {fd}: {event}"
            )
            open_chain[fd].append(event)
    return chains


def closed_events(events: list[Event]) -> dict[int, list[Event]]:
    """connection.closed events keyed by the index of their connection's accepted event."""
    result: dict[int, list[Event]] = {}
    current: dict[int, int] = {}
    for index, event in enumerate(events):
        if event.get("event") == "connection.accepted":
            current[int(event["fd"])] = index
            result[index] = []
        elif event.get("event") == "connection.closed":
            fd = int(event["fd"])
            assert fd in current, f"connection.closed for fd {fd} that was never accepted: {event}"
            result[current[fd]].append(event)
    return result


def assert_valid_chain(accepted: Event, chain: list[Event]) -> None:
    fd = accepted["fd"]
    assert chain, f"no connection.state events for fd {fd}"
    first = chain[0]
    assert (first["from"], first["to"], first["trigger"]) == (
        State.ACCEPTED,
        State.READING,
        Trigger.START,
    ), f"fd {fd}: first transition {first}"
    assert first["from"] == INITIAL
    state = State(first["from"])
    for step in chain:
        assert step["from"] == state, f"fd {fd}: chain broken at {step} (was in {state})"
        expected = next_state(state, Trigger(step["trigger"]))
        assert step["to"] == expected, (
            f"fd {fd}: {step} contradicts the transition table ({expected})"
        )
        state = State(step["to"])
    last = chain[-1]
    assert (last["to"], last["trigger"]) == (State.CLOSED, Trigger.RELEASE), (
        f"fd {fd}: last transition {last}"
    )
    assert [s for s in chain if s["to"] == State.CLOSED] == [last], (
        f"fd {fd}: closed more than once"
    )


def test_every_connection_follows_the_transition_table_to_closed(server: ServerProcess) -> None:
    chatty, half, rude, idle = server.connect_many(4)
    chatty.sock.sendall(b"hi all")
    for other in (half, rude, idle):
        assert recv_exactly(other.sock, 6) == b"hi all"
    chatty.sock.close()
    server.wait_closed(chatty)

    half.sock.sendall(b"leaving")
    half.sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(half.sock) == b""
    server.wait_closed(half)

    reset(rude.sock)
    server.wait_closed(rude)

    assert server.stop() == 0
    events = server.events()
    chains = state_chains(events)
    assert [a["peer"] for a, _ in chains] == [c.peer for c in (chatty, half, rude, idle)]
    for accepted, chain in chains:
        assert_valid_chain(accepted, chain)
    for accepted_index, closed in closed_events(events).items():
        assert len(closed) == 1, f"connection {events[accepted_index]} closed {len(closed)} times"


def test_closed_event_accounts_bytes_in_and_out(server: ServerProcess) -> None:
    clients = server.connect_many(3)
    # One distinct byte value per sender, so each receiver can count per sender.
    payloads = [b"A" * 1000, b"B" * 70_000, b"C" * 5]
    for client, payload in zip(clients, payloads, strict=True):
        client.sock.sendall(payload)
    received: list[int] = []
    for i, client in enumerate(clients):
        others = [p for j, p in enumerate(payloads) if j != i]
        data = recv_exactly(client.sock, sum(len(p) for p in others))
        for p in others:
            assert data.count(p[:1]) == len(p)
        received.append(len(data))
    for client in clients:
        client.sock.close()

    for client, payload, got in zip(clients, payloads, received, strict=True):
        closed = server.wait_closed(client)
        assert closed["peer"] == client.peer
        assert closed["reason"] == "peer_closed"
        assert closed["bytes_in"] == len(payload)
        assert closed["bytes_out"] == got
        assert isinstance(closed["seconds"], int | float) and closed["seconds"] >= 0
        assert server.bytes_received_from(client) == len(payload)
        assert server.bytes_sent_to(client) == got


def test_server_stopped_totals_match_what_clients_did(server: ServerProcess) -> None:
    clients = server.connect_many(3)
    sizes = (10, 2000, 333)
    for client, size in zip(clients, sizes, strict=True):
        client.sock.sendall(b"z" * size)
    delivered = 0
    for i, client in enumerate(clients):
        expected = sum(s for j, s in enumerate(sizes) if j != i)
        assert recv_exactly(client.sock, expected) == b"z" * expected
        delivered += expected

    assert server.stop() == 0
    stopped = server.events("server.stopped")
    assert len(stopped) == 1
    assert stopped[0]["connections"] == len(clients) == len(server.events("connection.accepted"))
    assert stopped[0]["bytes_in"] == sum(sizes)
    assert stopped[0]["bytes_out"] == delivered
    closed = server.events("connection.closed")
    assert sum(e["bytes_in"] for e in closed) == sum(sizes)
    assert sum(e["bytes_out"] for e in closed) == delivered


def test_data_sent_reports_the_remaining_queue(start_server: StartServer) -> None:
    server = start_server(*BACKLOG_LIMIT)
    _, reader, payload = queue_backlog(server)
    assert recv_exactly(reader.sock, len(payload), timeout=20) == payload
    server.wait_sent_to(reader, len(payload))
    sends = server.connection_events(reader, "data.sent")

    assert sum(e["bytes"] for e in sends) == len(payload)
    assert any(e["queued"] > 0 for e in sends), (
        "a reader that did not read should have had a backlog"
    )
    assert sends[-1]["queued"] == 0
    cumulative = 0
    high_water = 0
    for event in sends:
        assert isinstance(event["bytes"], int) and event["bytes"] > 0
        assert isinstance(event["queued"], int) and event["queued"] >= 0
        cumulative += event["bytes"]
        # sent-so-far + still-queued is everything enqueued so far: it never shrinks
        # and never exceeds what the writer sent.
        enqueued = cumulative + event["queued"]
        assert high_water <= enqueued <= len(payload), event
        high_water = enqueued
