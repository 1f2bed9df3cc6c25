"""``--config FILE``: options from a TOML file, the command line over it, every mistake one line.

Keys are the flags without their dashes; values are TOML's (numbers, booleans, arrays for the
repeatable options) or the strings the command line takes. A real server reads each file.
"""

from __future__ import annotations

import re
import socket
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import (
    HOST,
    WAIT,
    ServerProcess,
    StartServer,
    free_port,
    recv_exactly,
    run_cli,
    usage_error,
)

from fsmchat.options import GROUPS, OPTIONS, Options


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def started(server: ServerProcess) -> ServerProcess:
    server.port = int(server.wait_event("server.started")["port"])
    return server


def test_the_server_takes_its_options_from_the_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    port = free_port()
    config = write(tmp_path, f"""
        host = "{HOST}"
        port = {port}
        mode = "chat"
        max-queue-bytes = "1M"
        idle-timeout = 0.5
        history = 5
    """)
    server = started(start_server("--config", str(config), started=False))
    event = server.events("server.started")[0]
    assert (event["host"], event["port"], event["mode"]) == (HOST, port, "chat")
    assert event["max_queue_bytes"] == 1024 * 1024
    # history-bytes was not given: its default follows the file's max-queue-bytes.
    assert event["history"] == 5 and event["history_bytes"] == 1024 * 1024 // 4
    # A float of seconds from the file: a silent client is closed for it.
    assert server.wait_closed(server.connect())["reason"] == "idle_timeout"


def test_a_flag_on_the_command_line_wins_over_the_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:  # the file's port is taken: only the flag lets it start
        taken.bind((HOST, 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        config = write(tmp_path, f'host = "{HOST}"\nport = {taken_port}\nmode = "chat"\n')
        server = started(start_server("--config", str(config), "--port", "0", "--mode", "raw",
                                      started=False))
        event = server.events("server.started")[0]
    assert event["port"] not in (0, taken_port) and event["mode"] == "raw"
    relays(server)


def relays(server: ServerProcess) -> None:
    """What one client sends reaches another as it is (raw mode, both let in)."""
    a, b = server.connect(), server.connect()
    message = b"raw bytes, no names\n"
    a.sock.sendall(message)
    assert recv_exactly(b.sock, len(message)) == message


def test_a_list_allows_networks_and_the_command_line_replaces_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    config = write(tmp_path, 'allow = ["192.0.2.0/24", "2001:db8::/32"]\n')
    shut_out = start_server("--config", str(config))
    with socket.create_connection((HOST, shut_out.port), WAIT):
        rejected = shut_out.wait_event("connection.rejected")
    assert rejected["reason"] == "denied"

    relays(start_server("--config", str(config), "--allow", "127.0.0.0/8"))


def test_a_switch_is_true_or_false(start_server: StartServer, tmp_path: Path) -> None:
    off = start_server("--config", str(write(tmp_path, "reuse-port = false\n", "off.toml")))
    on = start_server("--config", str(write(tmp_path, "reuse-port = true\n", "on.toml")))
    # Only the one that asked for SO_REUSEPORT can share its port.
    refused = run_cli("--host", HOST, "--port", str(off.port), "--reuse-port")
    assert refused.returncode == 1, refused
    twin = start_server("--port", str(on.port), "--host", HOST, "--reuse-port", started=False)
    assert int(twin.wait_event("server.started")["port"]) == on.port


def the_command_lines_message(*args: str) -> str:
    """What the command line says of a bad value, without its ``argument --x:`` frame."""
    line = usage_error(run_cli("--host", HOST, *args), args[0])
    match = re.fullmatch(rf"fsmchat: argument {args[0]}: (.*) \(see --help\)", line)
    assert match, line
    return match.group(1)


@pytest.mark.parametrize(
    ("toml", "flag", "value"),
    [
        ('max-clients = "x"', "--max-clients", "x"),
        ("max-clients = 0", "--max-clients", "0"),
        ('max-queue-bytes = "1K"', "--max-queue-bytes", "1K"),
        ("port = 70000", "--port", "70000"),
        ("drain-timeout = -1.5", "--drain-timeout", "-1.5"),
        ('allow = ["10.0.0.0/33"]', "--allow", "10.0.0.0/33"),
        ('redis = "foo://"', "--redis", "foo://"),
        ('host = "a..b"', "--host", "a..b"),
    ],
    ids=lambda v: v if "=" in v else None,
)
def test_a_bad_value_says_what_the_command_line_says_naming_file_and_key(
    tmp_path: Path, toml: str, flag: str, value: str
) -> None:
    config = write(tmp_path, toml + "\n")
    key = flag.removeprefix("--")
    line = usage_error(run_cli("--config", str(config)), key)
    assert line == f"fsmchat: {config}: {key}: {the_command_lines_message(flag, value)}"


@pytest.mark.parametrize(
    ("toml", "key", "says"),
    [
        ('colour = "blue"', "colour", "unknown option"),
        ("max_clients = 5", "max_clients", "unknown option (did you mean max-clients?)"),
        ("[tls]\ncert = 'c.pem'", "tls", "unknown option (no [sections]"),
        ("port = true", "port", "expected a string or a number, not a boolean"),
        ("port = [1, 2]", "port", "expected a string or a number, not an array"),
        ("port = 2024-01-01", "port", "expected a string or a number, not a date or time"),
        ('no-plain = "yes"', "no-plain", "expected true or false, not 'yes'"),
        ('log-format = "xml"', "log-format", "invalid choice: 'xml'"),
        ("mode = 1", "mode", "invalid choice: '1'"),
        ('config = "other.toml"', "config", "a config file cannot name another one"),
    ],
    ids=lambda v: v.split("\n")[0] if "=" in v else None,
)
def test_a_key_or_value_the_file_cannot_have_is_one_line(
    tmp_path: Path, toml: str, key: str, says: str
) -> None:
    config = write(tmp_path, toml + "\n")
    line = usage_error(run_cli("--config", str(config)), f"{config}: {key}: ")
    assert line.startswith(f"fsmchat: {config}: {key}: {says}"), line


def test_a_file_that_is_not_toml_names_the_line(tmp_path: Path) -> None:
    config = write(tmp_path, 'port = 8080\nmode = "chat\n')
    line = usage_error(run_cli("--config", str(config)), str(config))
    assert line.startswith(f"fsmchat: {config}: invalid TOML: ") and "line 2" in line, line


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes('channel = "caf\u00e9"\n'.encode("latin-1"))
    line = usage_error(run_cli("--config", str(config)), str(config))
    assert "not UTF-8" in line, line


@pytest.mark.parametrize("which", ["missing", "a directory"])
def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path, which: str) -> None:
    config = tmp_path / "missing.toml" if which == "missing" else tmp_path
    line = usage_error(run_cli("--config", str(config)), str(config))
    reason = "No such file or directory" if which == "missing" else "Is a directory"
    assert line == f"fsmchat: {config}: cannot read the config file: {reason}"


def test_config_needs_a_file() -> None:
    usage_error(run_cli("--config"), "--config")


@pytest.mark.parametrize(
    ("toml", "args", "says"),
    [
        ('channel = "room"', [], "--channel needs --redis"),
        ("no-plain = true", [], "--no-plain needs --tls-cert and --tls-key"),
        ('tls-cert = "c.pem"', [], "--tls-cert and --tls-key go together"),
        ('mode = "chat"\nmax-line = "1K"', ["--mode", "raw"], "--max-line needs --mode chat"),
        ('history-bytes = "2M"', ["--history", "3"], "--history-bytes (2097152) must be at "
                                                     "most a quarter of --max-queue-bytes"),
        ("metrics-port = 7000", ["--port", "7000"], "--metrics-port must differ"),
    ],
    ids=lambda v: v.split("\n")[-1] if isinstance(v, str) and "=" in v else None,
)
def test_options_that_do_not_go_together_are_checked_across_file_and_command_line(
    tmp_path: Path, toml: str, args: list[str], says: str
) -> None:
    config = write(tmp_path, toml + "\n")
    line = usage_error(run_cli("--host", HOST, "--config", str(config), *args), says)
    assert line.startswith(f"fsmchat: {says}") and line.endswith("(see --help)"), line


def test_every_field_of_options_is_filled_by_exactly_one_option() -> None:
    """The catalogue and ``Options`` cannot drift apart: a field no flag fills (or two flags
    fill) would be a setting the command line and the file cannot reach the same way."""
    filled = [option.field for option in OPTIONS if option.field is not None]
    assert sorted(filled) == sorted(field.name for field in fields(Options))
    flags = [option.flag for option in OPTIONS]
    assert len(set(flags)) == len(flags)
    assert {option.group for option in OPTIONS} - {None} == {group.title for group in GROUPS}
