"""Graceful shutdown: SIGTERM/SIGINT drain queued data, the drain timeout, and a second signal."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import BACKLOG_LIMIT, ServerProcess, StartServer, queue_backlog, recv_until_eof


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
