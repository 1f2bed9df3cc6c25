"""Relay behaviour: what clients send and receive."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket

from conftest import (
    BACKLOG_LIMIT,
    BackgroundReader,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    queue_backlog,
    recv_exactly,
    recv_until_eof,
    reset,
)


def test_message_reaches_every_other_client_and_not_the_sender(server: ServerProcess) -> None:
    a, b, c = server.connect_many(3)

    a.sock.sendall(b"hello from a\n")
    assert recv_exactly(b.sock, 13) == b"hello from a\n"
    assert recv_exactly(c.sock, 13) == b"hello from a\n"

    # B speaks after A; per-connection queues are FIFO, so if A had been sent an
    # echo of its own message it would arrive before B's.
    b.sock.sendall(b"reply from b\n")
    assert recv_exactly(a.sock, 13) == b"reply from b\n"
    assert recv_exactly(c.sock, 13) == b"reply from b\n"

    c.sock.sendall(b"and c\n")
    assert recv_exactly(a.sock, 6) == b"and c\n"
    assert recv_exactly(b.sock, 6) == b"and c\n"

    # All three messages were delivered elsewhere after each sender's own message,
    # so nothing further may be pending for anyone.
    for client in (a, b, c):
        assert_nothing_arrives(client.sock)


def test_binary_bytes_are_forwarded_unchanged(server: ServerProcess) -> None:
    sender, receiver = server.connect_many(2)
    payload = bytes(range(256)) * 16 + b"\x00\x00\r\n\x00no newline at the end\xff"
    sender.sock.sendall(payload)
    assert recv_exactly(receiver.sock, len(payload)) == payload


def test_message_without_newline_is_forwarded_without_waiting_for_more(
    server: ServerProcess,
) -> None:
    sender, receiver = server.connect_many(2)
    sender.sock.sendall(b"x")
    assert recv_exactly(receiver.sock, 1) == b"x"


def test_per_sender_order_is_preserved(server: ServerProcess) -> None:
    sender, receiver = server.connect_many(2)
    messages = [f"{i:05d};".encode() for i in range(2000)]
    for message in messages:
        sender.sock.sendall(message)
    expected = b"".join(messages)
    assert recv_exactly(receiver.sock, len(expected)) == expected


def test_interleaved_senders_each_keep_their_order(server: ServerProcess) -> None:
    a, b, reader = server.connect_many(3)
    for i in range(300):
        a.sock.sendall(f"a:{i}\n".encode())
        b.sock.sendall(f"b:{i}\n".encode())
    expected_len = sum(len(f"a:{i}\n") + len(f"b:{i}\n") for i in range(300))
    lines = recv_exactly(reader.sock, expected_len).decode().splitlines()
    assert [line for line in lines if line.startswith("a:")] == [f"a:{i}" for i in range(300)]
    assert [line for line in lines if line.startswith("b:")] == [f"b:{i}" for i in range(300)]


def test_multi_mib_message_reaches_every_reader_intact(server: ServerProcess) -> None:
    sender = server.connect()
    readers = server.connect_many(3)
    payload = os.urandom(6 * 1024 * 1024 + 12345)
    background = [BackgroundReader(r.sock, len(payload)) for r in readers]
    sender.sock.settimeout(30)
    sender.sock.sendall(payload)
    digest = hashlib.sha256(payload).hexdigest()
    for reader in background:
        data = reader.result()
        assert len(data) == len(payload)
        assert hashlib.sha256(data).hexdigest() == digest
    # The sender's own bytes were not echoed: a later message from a reader is
    # the first thing the sender sees.
    readers[0].sock.sendall(b"done")
    assert recv_exactly(sender.sock, 4) == b"done"


def test_many_clients_all_receive_all_other_messages_in_order(start_server: StartServer) -> None:
    server = start_server("--max-clients-per-addr", "0")  # 120 clients, all from 127.0.0.1
    count, per_client = 120, 3
    clients = server.connect_many(count)
    rng = random.Random(1234)
    sent: dict[int, list[bytes]] = {i: [] for i in range(count)}
    for seq in range(per_client):
        order = list(range(count))
        rng.shuffle(order)
        for i in order:
            message = f"c{i}:{seq}:{'x' * rng.randrange(0, 20)}\n".encode()
            sent[i].append(message)
            clients[i].sock.sendall(message)

    total = sum(len(m) for msgs in sent.values() for m in msgs)
    pattern = re.compile(rb"c(\d+):(\d+):x*\n")
    for i, client in enumerate(clients):
        expected_len = total - sum(len(m) for m in sent[i])
        stream = recv_exactly(client.sock, expected_len, timeout=20)
        by_sender: dict[int, list[bytes]] = {}
        pos = 0
        while pos < len(stream):
            match = pattern.match(stream, pos)
            assert match is not None, (
                f"client {i}: garbled stream at {pos}: {stream[pos : pos + 60]!r}"
            )
            by_sender.setdefault(int(match.group(1)), []).append(match.group(0))
            pos = match.end()
        assert i not in by_sender, f"client {i} received its own messages"
        assert by_sender == {j: sent[j] for j in range(count) if j != i}


def test_half_closed_sender_data_arrives_and_its_connection_is_closed(
    server: ServerProcess,
) -> None:
    quitter, listener = server.connect_many(2)
    quitter.sock.sendall(b"last words")
    quitter.sock.shutdown(socket.SHUT_WR)
    assert recv_exactly(listener.sock, 10) == b"last words"
    assert recv_until_eof(quitter.sock) == b""
    assert server.wait_closed(quitter)["reason"] == "peer_closed"
    # The remaining client can still talk to newcomers.
    newcomer = server.connect()
    listener.sock.sendall(b"still here")
    assert recv_exactly(newcomer.sock, 10) == b"still here"
    assert server.proc.poll() is None


def test_half_closed_client_still_gets_what_was_queued_for_it(start_server: StartServer) -> None:
    server = start_server(*BACKLOG_LIMIT)
    talker, quitter, payload = queue_backlog(server)
    # The quitter has not read anything; much of the payload is queued in the server.
    quitter.sock.sendall(b"bye")
    quitter.sock.shutdown(socket.SHUT_WR)
    assert recv_exactly(talker.sock, 3) == b"bye"
    received = recv_until_eof(quitter.sock, timeout=20)
    assert len(received) == len(payload)
    assert received == payload
    assert server.wait_closed(quitter)["reason"] == "peer_closed"


def test_abrupt_reset_does_not_disturb_the_others(server: ServerProcess) -> None:
    a, b = server.connect_many(2)
    victim = server.connect(rcvbuf=16 * 1024)
    victim.sock.sendall(b"before reset")
    assert recv_exactly(a.sock, 12) == b"before reset"
    assert recv_exactly(b.sock, 12) == b"before reset"

    # Queue data for the victim (it never reads), then reset it mid-conversation.
    bulk = os.urandom(4 * 1024 * 1024)
    reader = BackgroundReader(b.sock, len(bulk))
    a.sock.settimeout(30)
    a.sock.sendall(bulk)
    assert reader.result() == bulk
    reset(victim.sock)

    closed = server.wait_closed(victim)
    assert isinstance(closed["reason"], str) and closed["reason"]

    for i in range(20):
        a.sock.sendall(f"a{i};".encode())
        assert recv_exactly(b.sock, len(f"a{i};")) == f"a{i};".encode()
        b.sock.sendall(f"b{i};".encode())
        assert recv_exactly(a.sock, len(f"b{i};")) == f"b{i};".encode()

    newcomer = server.connect()
    a.sock.sendall(b"welcome")
    assert recv_exactly(newcomer.sock, 7) == b"welcome"
    assert recv_exactly(b.sock, 7) == b"welcome"
    assert server.proc.poll() is None
