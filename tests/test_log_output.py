"""The structured log on stdout: JSON shape, event levels and fields, --log-level, --log-format."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import (
    HOST,
    WAIT,
    ServerProcess,
    StartServer,
    free_port,
    recv_exactly,
    recv_until_eof,
)

LEVELS = ("debug", "info", "warning", "error", "critical")

#: event name -> (level, required fields)
SCHEMA: dict[str, tuple[str, frozenset[str]]] = {
    "server.started": ("info", frozenset({"host", "port"})),
    "connection.accepted": ("info", frozenset({"fd", "peer"})),
    "data.received": ("debug", frozenset({"fd", "bytes"})),
    "data.sent": ("debug", frozenset({"fd", "bytes", "queued"})),
    "connection.state": ("debug", frozenset({"fd", "from", "to", "trigger"})),
    "connection.closed": (
        "info",
        frozenset({"fd", "peer", "reason", "bytes_in", "bytes_out", "seconds"}),
    ),
    "connection.rejected": ("warning", frozenset({"peer", "reason"})),
    "server.stopping": ("info", frozenset({"signal"})),
    "server.stopped": ("info", frozenset({"connections", "bytes_in", "bytes_out"})),
    "server.failed": ("error", frozenset({"error"})),
}


def exercise(server: ServerProcess) -> None:
    """Some traffic touching every normal event: connect, relay, half-close, stop."""
    a, b = server.connect_many(2)
    a.sock.sendall(b"ping")
    assert recv_exactly(b.sock, 4) == b"ping"
    b.sock.sendall(b"pong")
    assert recv_exactly(a.sock, 4) == b"pong"
    a.sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(a.sock) == b""
    server.wait_closed(a)
    assert server.stop() == 0


def parse_timestamp(value: Any) -> datetime:
    assert isinstance(value, str), value
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    return datetime.fromisoformat(text)


def test_every_stdout_line_is_a_json_event_with_timestamp_level_and_event(
    server: ServerProcess,
) -> None:
    started_at = datetime.now(UTC)
    exercise(server)
    finished_at = datetime.now(UTC)

    assert server.bad_lines() == []
    lines = server.lines()
    assert len(lines) == len(server.events()) > 0
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict)
        assert isinstance(event["event"], str) and event["event"]
        assert event["level"] in LEVELS
        stamp = parse_timestamp(event["timestamp"])
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0), event["timestamp"]
        # Started before the fixture's server.started; allow a small margin.
        assert started_at - timedelta(seconds=30) <= stamp <= finished_at + timedelta(seconds=1), (
            event
        )


def test_events_have_their_documented_level_and_fields(server: ServerProcess) -> None:
    exercise(server)
    events = server.events()
    seen = {e["event"] for e in events}
    expected_seen = set(SCHEMA) - {"connection.rejected", "server.failed"}
    assert expected_seen <= seen, f"missing events: {expected_seen - seen}"
    for event in events:
        name = event["event"]
        if name not in SCHEMA:
            continue
        level, fields = SCHEMA[name]
        assert event["level"] == level, event
        assert fields <= set(event), f"{name} lacks {fields - set(event)}: {event}"


def test_event_field_types(server: ServerProcess) -> None:
    exercise(server)
    for event in server.events():
        for key in ("fd", "bytes", "queued", "bytes_in", "bytes_out", "connections", "port"):
            if key in event:
                assert isinstance(event[key], int) and not isinstance(event[key], bool), event
                assert event[key] >= 0, event
        for key in ("peer", "reason", "from", "to", "trigger", "host", "signal", "error"):
            if key in event:
                assert isinstance(event[key], str), event
        if "seconds" in event:
            assert isinstance(event["seconds"], int | float) and event["seconds"] >= 0, event


def test_log_level_info_hides_debug_events(start_server: StartServer) -> None:
    server = start_server("--log-level", "info")
    exercise(server)
    events = server.events()
    assert server.bad_lines() == []
    assert [e for e in events if e["level"] == "debug"] == []
    names = {e["event"] for e in events}
    assert names.isdisjoint({"data.received", "data.sent", "connection.state"})
    assert {"server.started", "connection.accepted", "connection.closed", "server.stopped"} <= names


def wait_until_listening(port: int, timeout: float = WAIT) -> socket.socket:
    """Connect to a server whose log we cannot use for readiness."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=2)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # no log line to wait on: the server is told to stay quiet


def test_log_level_warning_hides_info_events(start_server: StartServer) -> None:
    port = free_port()
    server = start_server(
        "--host", HOST, "--port", str(port), "--log-level", "warning", started=False
    )
    first = wait_until_listening(port)
    second = wait_until_listening(port)
    # No accepted events to wait on: retry until a message crosses.
    deadline = time.monotonic() + WAIT
    second.settimeout(0.1)
    received = b""
    while not received and time.monotonic() < deadline:
        first.sendall(b"!")
        with contextlib.suppress(TimeoutError):
            received = second.recv(1)
    assert received == b"!"
    first.close()
    second.close()
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert server.bad_lines() == []
    assert [e for e in server.events() if e["level"] in ("debug", "info")] == []


def test_console_format_is_human_readable_and_names_events(start_server: StartServer) -> None:
    port = free_port()
    server = start_server(
        "--host", HOST, "--port", str(port), "--log-format", "console", started=False
    )
    started_line = server.wait_line(lambda line: "server.started" in line)
    with socket.create_connection((HOST, port), timeout=5):
        server.wait_line(lambda line: "connection.accepted" in line)
    server.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert started_line.strip()
    lines = [line for line in server.lines() if line.strip()]
    assert any("server.stopped" in line for line in lines)
    for line in lines:
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        raise AssertionError(f"console format printed JSON: {parsed!r}")
