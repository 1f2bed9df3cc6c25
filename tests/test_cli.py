"""Command-line interface: argument errors, startup failures, --help, defaults."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import HOST, StartServer, run_cli, usage_error

from fsmchat.cli import build_parser

OPTIONS = ("--port", "--host", "--log-level", "--log-format", "--drain-timeout")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--port", "-5"], "--port"),
        (["--port", "65536"], "--port"),
        (["--log-level", "loud"], "--log-level"),
        (["--log-format", "xml"], "--log-format"),
        (["--drain-timeout", "-1"], "--drain-timeout"),
        (["--drain-timeout", "soon"], "--drain-timeout"),
        (["--allow", "10.0.0.0/33"], "--allow"),
        (["--deny", "localhost"], "--deny"),
        (["--idle-timeout", "-3"], "--idle-timeout"),
        (["--max-recv-rate", "0"], "--max-recv-rate"),
        (["--max-recv-rate", "fast"], "--max-recv-rate"),
        (["--tls-cert", "c.pem"], "--tls-cert"),
        (["--tls-port", "8443"], "--tls-port"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca"),
        (["--no-plain"], "--no-plain"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem", "--no-plain"], "--no-plain"),
        (["--handshake-timeout", "x"], "--handshake-timeout"),
        (["--host", "a..b"], "--host"),
        (["--host", "a" * 300], "--host"),
        (["--metrics-port", "0", "--metrics-host", "a..b"], "--metrics-host"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_argument_exits_2_with_one_line_naming_the_option(args: list[str], option: str) -> None:
    usage_error(run_cli("--host", HOST, *args), option)


def test_unknown_option_exits_2_with_one_line() -> None:
    usage_error(run_cli("--colour", "blue"), "--colour")


def test_port_in_use_fails_with_a_clear_message_and_an_error_event() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((HOST, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli("--host", HOST, "--port", str(port))

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {lines!r}"

    events = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [e for e in events if e["event"] == "server.failed"]
    assert len(failed) == 1, events
    assert failed[0]["level"] == "error"
    assert isinstance(failed[0]["error"], str) and failed[0]["error"]
    assert not [e for e in events if e["event"] == "server.started"]


def test_help_exits_zero_and_lists_every_option() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result
    for option in OPTIONS:
        assert option in result.stdout, f"{option} missing from --help"


def test_default_port_is_8080() -> None:
    # Parsed, not bound: a real bind of 8080 would depend on the machine's other listeners.
    assert build_parser().parse_args([]).port == 8080
    assert "8080" in run_cli("--help").stdout


def test_started_event_reports_the_bound_address(start_server: StartServer) -> None:
    server = start_server()
    started = server.events("server.started")[0]
    assert started["host"] == HOST
    assert isinstance(started["port"], int) and 0 < started["port"] < 65536
    with socket.create_connection((HOST, started["port"]), timeout=5) as sock:
        peer = "{}:{}".format(*sock.getsockname()[:2])
        server.wait_event("connection.accepted", peer=peer)


def test_default_host_listens_on_all_interfaces(start_server: StartServer) -> None:
    server = start_server("--port", "0", started=False)
    port = server.port
    # Reachable over loopback, and reported as the wildcard address.
    with socket.create_connection((HOST, port), timeout=5):
        server.wait_event("connection.accepted")
    assert server.events("server.started")[0]["host"] in ("0.0.0.0", "", "::")


@pytest.mark.parametrize("which", ["missing", "not a certificate"])
def test_an_unusable_certificate_exits_2_with_one_line(tmp_path: Path, which: str) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if which == "not a certificate":
        cert.write_text("hello\n")
        key.write_text("hello\n")
    result = run_cli("--host", HOST, "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(cert if which == "missing" else key).split("/")[-1] in lines[0]
    assert "Traceback" not in result.stderr
