"""Graceful shutdown: a stop reads what clients had sent and drains queued data; the drain
timeout and a second signal cut it short, and say what they cut; SIGHUP and SIGUSR1."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
from conftest import (
    BACKLOG_LIMIT,
    WAIT,
    ServerProcess,
    StartServer,
    StreamReader,
    queue_backlog,
    recv_exactly,
    recv_until_eof,
    wait_event_count,
)


@pytest.fixture
def server(start_server: StartServer) -> ServerProcess:
    return start_server(*BACKLOG_LIMIT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_queued_data_then_exits_zero(
    server: ServerProcess, sig: signal.Signals
) -> None:
    writer, reader, payload = queue_backlog(server)
    server.send_signal(sig)
    assert server.wait_event("server.stopping")["signal"] == sig.name

    received = recv_until_eof(reader.sock, timeout=20)
    assert len(received) == len(payload)
    assert received == payload
    assert recv_until_eof(writer.sock) == b""
    assert server.wait_exit() == 0

    names = [e["event"] for e in server.events()]
    assert names.index("server.stopping") < names.index("server.stopped")
    assert names[-1] == "server.stopped"
    assert len(server.events("connection.closed")) == len(server.events("connection.accepted")) == 2


def test_no_new_connections_are_accepted_while_stopping(server: ServerProcess) -> None:
    _, reader, payload = queue_backlog(server)
    server.send_signal(signal.SIGTERM)
    server.wait_event("server.stopping")

    # The reader has not read yet, so the server is still draining.
    late = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    late.settimeout(5)
    try:
        late.connect(("127.0.0.1", server.port))
        late_peer: str | None = "{}:{}".format(*late.getsockname()[:2])
    except OSError:
        late_peer = None  # refused: also fine
    assert server.proc.poll() is None, "server should still be draining"

    assert recv_until_eof(reader.sock, timeout=20) == payload
    assert server.wait_exit() == 0
    late.close()
    accepted = [e["peer"] for e in server.events("connection.accepted")]
    assert late_peer not in accepted
    assert len(accepted) == 2


def test_idle_server_stops_cleanly_on_sigterm(server: ServerProcess) -> None:
    assert server.stop(signal.SIGTERM) == 0
    assert server.events("server.stopping")[0]["signal"] == "SIGTERM"
    stopped = server.events("server.stopped")
    assert len(stopped) == 1
    assert (stopped[0]["connections"], stopped[0]["bytes_in"], stopped[0]["bytes_out"]) == (0, 0, 0)


def test_listening_port_is_released_after_stop(server: ServerProcess) -> None:
    port = server.port
    assert server.stop() == 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))


def test_drain_timeout_closes_a_reader_that_never_reads(start_server: StartServer) -> None:
    server = start_server("--drain-timeout", "0.5", *BACKLOG_LIMIT)
    _, reader, payload = queue_backlog(server)
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=8) == 0
    elapsed = time.monotonic() - began
    assert elapsed < 4.0, f"exit took {elapsed:.1f}s with --drain-timeout 0.5"

    closed = server.wait_closed(reader)
    assert closed["reason"] == "drain_timeout"
    assert closed["bytes_out"] < len(payload)
    assert server.events("server.stopped"), "server.stopped must be logged after a drain timeout"


def test_drain_waits_at_least_the_drain_timeout_for_a_slow_reader(
    start_server: StartServer,
) -> None:
    server = start_server("--drain-timeout", "1.5", *BACKLOG_LIMIT)
    _, reader, _ = queue_backlog(server)
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0
    elapsed = time.monotonic() - began
    assert elapsed >= 1.4, f"server gave up after {elapsed:.2f}s, before --drain-timeout 1.5"
    assert server.wait_closed(reader)["reason"] == "drain_timeout"


def test_second_sigterm_closes_everything_at_once(start_server: StartServer) -> None:
    server = start_server("--drain-timeout", "60", *BACKLOG_LIMIT)
    writer, reader, _ = queue_backlog(server)
    server.send_signal(signal.SIGTERM)
    server.wait_event("server.stopping")
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=8) == 0
    assert time.monotonic() - began < 5.0
    for client in (writer, reader):
        reason = server.wait_closed(client)["reason"]
        assert isinstance(reason, str) and reason
    assert len(server.events("server.stopped")) == 1


def test_default_drain_timeout_is_five_seconds(server: ServerProcess) -> None:
    _, reader, _ = queue_backlog(server)
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=15) == 0
    elapsed = time.monotonic() - began
    assert 4.8 <= elapsed < 9.0, f"stuck reader held the server for {elapsed:.2f}s (expected ~5s)"
    assert server.wait_closed(reader)["reason"] == "drain_timeout"


def test_drain_timeout_counts_what_it_cut_off(start_server: StartServer) -> None:
    server = start_server("--drain-timeout", "0.5", *BACKLOG_LIMIT)
    _, reader, payload = queue_backlog(server)
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit(timeout=8) == 0
    closed = server.wait_closed(reader)
    stopped = server.events("server.stopped")[-1]
    assert stopped["undrained"] == 1
    assert stopped["undelivered_bytes"] == len(payload) - closed["bytes_out"]
    assert stopped["unread_bytes"] == 0


# -- a stop delivers what clients had sent --------------------------------------------------


def _hashed_reader(sock: socket.socket) -> tuple[StreamReader, Any]:
    digest = hashlib.sha256()
    return StreamReader(sock, on_chunk=digest.update, timeout=20), digest


@pytest.mark.parametrize("closes", [False, True], ids=["still-connected", "closed-its-side"])
def test_a_stop_delivers_what_a_sender_had_handed_to_tcp(
    start_server: StartServer, closes: bool
) -> None:
    """The sender's burst still in TCP buffers (or all it sent before it closed) when SIGTERM
    arrives reaches the other client whole, through flow control, and the exit status is 0."""
    size, limit = (8 << 20, "1M") if closes else (4 << 20, "4M")
    server = start_server("--max-queue-bytes", limit, "--log-level", "info")
    sender = server.connect()
    receiver = server.connect(rcvbuf=16 * 1024)
    stream, digest = _hashed_reader(receiver.sock)
    payload = os.urandom(size)
    sender.sock.settimeout(20)
    sender.sock.sendall(payload)
    if closes:
        sender.sock.close()
    server.send_signal(signal.SIGTERM)
    assert stream.result().eof
    assert stream.received == size
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert server.wait_exit(timeout=15) == 0
    stopped = server.events("server.stopped")[-1]
    assert (stopped["undrained"], stopped["undelivered_bytes"], stopped["unread_bytes"]) == (
        0, 0, 0)
    assert server.events()[-1]["event"] == "server.stopped"


def test_a_chat_line_read_during_the_stop_goes_out_like_any_other(
    start_server: StartServer,
) -> None:
    server = start_server("--mode", "chat", "--log-level", "info")
    sender = server.connect()
    receiver = server.connect(rcvbuf=16 * 1024)
    stream = StreamReader(receiver.sock, keep=True, timeout=20)
    lines = [b"line %06d %s\n" % (n, b"x" * 200) for n in range(20_000)]
    sender.sock.settimeout(20)
    sender.sock.sendall(b"/nick sender\n" + b"".join(lines) + b"unfinished, then EOF")
    sender.sock.shutdown(socket.SHUT_WR)
    server.send_signal(signal.SIGTERM)
    assert stream.result().eof
    said = [line for line in stream.data.splitlines(keepends=True) if line.startswith(b"<")]
    assert said == [b"<sender> " + line for line in [*lines, b"unfinished, then EOF\n"]]
    assert stream.data.endswith(b"*** sender left lobby\n*** the server is shutting down\n")
    assert server.wait_exit(timeout=15) == 0


@pytest.mark.parametrize("sig", [signal.SIGHUP], ids=["SIGHUP"])
def test_sighup_stops_like_sigterm(server: ServerProcess, sig: signal.Signals) -> None:
    _, reader, payload = queue_backlog(server)
    server.send_signal(sig)
    assert server.wait_event("server.stopping")["signal"] == sig.name
    assert recv_until_eof(reader.sock, timeout=20) == payload
    assert server.wait_exit() == 0
    assert server.events()[-1]["event"] == "server.stopped"


def test_sigusr1_asks_for_stats_and_does_not_stop(start_server: StartServer) -> None:
    server = start_server("--stats-interval", "0")
    a, b = server.connect_many(2)
    server.send_signal(signal.SIGUSR1)
    stats = server.wait_event("server.stats")
    assert stats["accepted"] == 2
    a.sock.sendall(b"still here\n")
    assert recv_exactly(b.sock, 11) == b"still here\n"
    server.send_signal(signal.SIGUSR1)
    wait_event_count(server, "server.stats", 2)
    assert server.stop() == 0


def test_a_sender_on_a_slow_link_is_read_to_its_end(start_server: StartServer) -> None:
    """What a sender had handed to TCP may still be on its way (a slow link, a network's round
    trip): an empty socket for a moment is not the end of it. 1 MiB through a link of 16 KiB
    every 10 ms, SIGTERM once the first of it arrived: all of it reaches the reader."""
    server = start_server("--log-level", "info")
    sender = server.connect()
    receiver = server.connect()
    stream, digest = _hashed_reader(receiver.sock)
    payload = os.urandom(1 << 20)

    def slow_link() -> None:
        for start in range(0, len(payload), 16 * 1024):
            sender.sock.sendall(payload[start:start + 16 * 1024])
            time.sleep(0.01)  # the link's pace, not a wait for the server
        sender.sock.shutdown(socket.SHUT_WR)

    link = threading.Thread(target=slow_link, daemon=True)
    link.start()
    stream.wait_received(64 * 1024)
    server.send_signal(signal.SIGTERM)
    link.join(WAIT)
    assert stream.result().received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert server.wait_exit() == 0


def test_a_client_the_rate_limit_holds_back_does_not_hold_up_the_stop(
    start_server: StartServer,
) -> None:
    """A sender limited to 1 KB/s with 180 KB to go: at half the drain timeout its reading
    ends (what it had sent is counted as unread), and everyone else drains as usual instead of
    being cut off by the drain timeout."""
    server = start_server("--mode", "chat", "--max-recv-rate", "1K", "--drain-timeout", "2",
                          "--log-level", "info")
    sender = server.connect()
    receiver = server.connect()
    stream = StreamReader(receiver.sock, keep=True, timeout=20)
    sender.sock.sendall(b"hello\n" * 30_000)
    stream.wait_received(len(b"<user1> hello\n"))
    began = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert stream.result().eof
    assert stream.data.endswith(b"*** the server is shutting down\n")
    assert server.wait_exit() == 0
    assert time.monotonic() - began < 2.0, "the stop waited for the drain timeout"
    assert server.wait_closed(receiver)["reason"] == "server_shutdown"
    stopped = server.events("server.stopped")[-1]
    assert stopped["undrained"] == 0 and stopped["unread_bytes"] > 0
