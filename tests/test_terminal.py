"""What a person starting fsmchat sees: events for people on a terminal, and where to connect.

``--log-format auto`` (the default) renders events for people when stdout is a terminal and as
JSON otherwise; the line on stderr says where to connect when stderr is a terminal or the level
hides ``server.started``. The terminals here are real ptys; the ports the line tells are used.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import (
    HOST,
    WAIT,
    LineReader,
    StartServer,
    recv_exactly,
    server_command,
    server_env,
)
from tls_certs import TlsFiles, client_context, make_tls_files, tls_args

LINE = re.compile(r"fsmchat: listening on (?P<listening>.*?) \((?P<mode>\w+) mode\): "
                  r"connect with (?P<commands>[^;]*)(?P<rest>.*)")


class OnTerminal:
    """A server whose stdout and stderr are one pty, read by a thread into ``text``."""

    def __init__(self, *args: str) -> None:
        self.controller, terminal = pty.openpty()
        self.proc = subprocess.Popen(server_command("--port", "0", "--host", HOST, *args),
                                     stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                                     env=server_env())
        os.close(terminal)  # the server holds it now: EIO here once it exits
        self.cond = threading.Condition()
        self.text = ""
        self.ended = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := os.read(self.controller, 1 << 16):
                with self.cond:
                    self.text += chunk.decode(errors="replace").replace("\r\n", "\n")
                    self.cond.notify_all()
        except OSError:  # EIO: the last writer is gone
            pass
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait(self, pattern: str) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def ready() -> bool:
            match = re.search(pattern, self.text, re.M)
            if match:
                found.append(match)
            return bool(match) or self.ended

        with self.cond:
            assert self.cond.wait_for(ready, WAIT) and found, f"no {pattern!r} in:\n{self.text}"
        return found[0]

    def stop(self) -> list[str]:
        """SIGTERM; every line it wrote, once it exited 0."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(WAIT) == 0
        self.thread.join(WAIT)
        with self.cond:
            return [line for line in self.text.splitlines() if line.strip()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        self.thread.join(WAIT)
        os.close(self.controller)


@pytest.fixture
def on_terminal() -> Iterator[list[OnTerminal]]:
    servers: list[OnTerminal] = []
    yield servers
    for server in servers:
        server.close()


def chat_through(port: int) -> None:
    """Two clients on ``port``; what the second sends, the first receives (it was accepted
    first, so it is in the chat once the second's bytes are read)."""
    with socket.create_connection((HOST, port), WAIT) as first, \
            socket.create_connection((HOST, port), WAIT) as second:
        message = b"anyone there?\n"
        second.sendall(message)
        assert recv_exactly(first, len(message)) == message


def is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_on_a_terminal_events_are_for_people_and_the_line_says_where_to_connect(
    on_terminal: list[OnTerminal],
) -> None:
    server = OnTerminal()
    on_terminal.append(server)
    port = int(server.wait(r"^fsmchat: listening on port (\d+) \(raw mode\)").group(1))
    server.wait(r"server\.started")
    chat_through(port)
    server.wait(r"connection\.accepted")
    lines = server.stop()
    said = [line for line in lines if line.startswith("fsmchat: ")]
    assert len(said) == 1 and f"nc {HOST} {port}" in said[0], said
    assert "anonymous" in said[0] and "--mode chat" in said[0], said
    events = [line for line in lines if not line.startswith("fsmchat: ")]
    assert any("server.started" in line and f"port={port}" in line for line in events), events
    assert any("server.stopped" in line for line in events), events
    assert not [line for line in events if is_json(line)], events


def test_on_a_terminal_log_format_json_still_writes_json(on_terminal: list[OnTerminal]) -> None:
    server = OnTerminal("--log-format", "json", "--mode", "chat")
    on_terminal.append(server)
    port = int(server.wait(r"^fsmchat: listening on port (\d+) \(chat mode\)").group(1))
    server.wait(r'"event":"server\.started"')
    lines = server.stop()
    said = [line for line in lines if line.startswith("fsmchat: ")]
    assert len(said) == 1 and "anonymous" not in said[0], said
    events = [json.loads(line) for line in lines if not line.startswith("fsmchat: ")]
    assert events[0]["event"] == "server.started" and events[0]["port"] == port
    assert events[-1]["event"] == "server.stopped"


class Piped:
    """A server whose stdout and stderr are pipes, each read into lines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(server_command("--host", HOST, "--port", "0", *args),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=server_env())
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = LineReader(self.proc.stdout)
        self.stderr = LineReader(self.proc.stderr)

    def said(self) -> re.Match[str]:
        line = self.stderr.wait_line(lambda line: line.startswith("fsmchat: listening"))
        match = LINE.fullmatch(line)
        assert match, line
        return match

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(WAIT) == 0
        self.stdout.join()
        self.stderr.join()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def piped() -> Iterator[list[Piped]]:
    servers: list[Piped] = []
    yield servers
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_with_the_level_hiding_server_started_the_line_tells_the_port_and_nc_works(
    piped: list[Piped],
) -> None:
    """``--port 0 --log-level warning``: the line is the one place that tells the port, and the
    command it gives connects."""
    server = Piped("--log-level", "warning")
    piped.append(server)
    said = server.said()
    assert said["mode"] == "raw" and "anonymous" in said["rest"] and "--mode chat" in said["rest"]
    command = said["commands"].split()
    assert command[:2] == ["nc", HOST], command
    port = int(command[2])
    with socket.create_connection((HOST, port), WAIT) as reader, \
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as nc:
        assert nc.stdin is not None
        try:  # nc connects after the reader: once its bytes are read, the reader is in the chat
            message = b"typed into nc\n"
            nc.stdin.write(message)
            nc.stdin.flush()
            assert recv_exactly(reader, len(message)) == message
        finally:
            nc.kill()
    server.stop()
    assert server.stdout.tail(1000) == []  # no server.started at this level: nothing else told


def test_the_line_names_the_tls_port_and_the_metrics(piped: list[Piped], files: TlsFiles) -> None:
    server = Piped(*tls_args(files), "--metrics-port", "0", "--mode", "chat",
                   "--log-level", "warning")
    piped.append(server)
    said = server.said()
    plain, tls = (int(port) for port in re.findall(r"\d+", said["listening"]))
    assert said["listening"] == f"port {plain}, TLS on port {tls}" and said["mode"] == "chat"
    assert said["commands"] == (f"nc {HOST} {plain} or openssl s_client -connect {HOST}:{tls}")
    metrics = re.fullmatch(rf"; metrics at (http://{re.escape(HOST)}:\d+/metrics)", said["rest"])
    assert metrics, said["rest"]

    with socket.create_connection((HOST, plain), WAIT) as client:
        assert recv_exactly(client, 12) == b"*** welcome,"
    context = client_context(files)
    with socket.create_connection((HOST, tls), WAIT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as client:
        assert recv_exactly(client, 12) == b"*** welcome,"
    with urllib.request.urlopen(metrics.group(1), timeout=WAIT) as response:
        assert response.status == 200 and b"fsmchat_" in response.read()
    server.stop()


def test_stderr_stays_for_problems_when_nobody_needs_the_line(start_server: StartServer) -> None:
    """Pipes, and server.started at this level: stderr gets nothing from a start and a stop."""
    server = start_server()
    chat_through(server.port)
    assert server.stop() == 0
    assert server.stderr() == ""
