"""Connection limits: --max-clients, descriptors select() cannot watch, and running out of them.

The server must refuse what it cannot serve (``connection.rejected``), keep serving the clients
it has, and never spin on a listener it cannot accept from (``accept.failed`` once per episode,
``accept.resumed`` when accepting works again).
"""

from __future__ import annotations

import functools
import resource
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import conftest
import pytest
from conftest import (
    CLOCK_TICKS,
    HOST,
    Event,
    ServerProcess,
    StartServer,
    closed_by_server,
    peer_of,
    proc_cpu_ticks,
    recv_exactly,
    run_cli,
    usage_error,
    wait_event_count,
)

from fsmchat.options import DEFAULT_MAX_CLIENTS_PER_ADDR

FD_SETSIZE = 1024
DEFAULT_QUEUE = 4 * 1024 * 1024

# --------------------------------------------------------------------------
# The options
# --------------------------------------------------------------------------


@functools.cache
def help_text() -> str:
    result = run_cli("--help")
    assert result.returncode == 0, result
    return result.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--max-queue-bytes", "65535"], "--max-queue-bytes"),
        (["--max-queue-bytes", "63K"], "--max-queue-bytes"),
        (["--max-queue-bytes", "0"], "--max-queue-bytes"),
        (["--max-queue-bytes", "-4M"], "--max-queue-bytes"),
        (["--max-queue-bytes", "lots"], "--max-queue-bytes"),
        (["--max-queue-bytes", "4X"], "--max-queue-bytes"),
        (["--max-clients", "0"], "--max-clients"),
        (["--max-clients", "1009"], "--max-clients"),
        (["--max-clients", "many"], "--max-clients"),
        (["--max-clients-per-addr", "-1"], "--max-clients-per-addr"),
        (["--max-clients-per-addr", "1009"], "--max-clients-per-addr"),
        (["--max-clients-per-addr", "some"], "--max-clients-per-addr"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_limit_exits_2_with_one_line_naming_the_option(args: list[str], option: str) -> None:
    # Without the option argparse would also exit 2 with one line naming it ("unrecognized
    # arguments"), so the test first requires --help to list it: it fails without the option.
    assert option in help_text()
    usage_error(run_cli("--port", "0", "--host", HOST, *args), option)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("65536", 65536),
        ("64K", 65536),
        ("512k", 512 * 1024),
        ("4M", DEFAULT_QUEUE),
        ("1g", 1 << 30),
    ],
)
def test_max_queue_bytes_accepts_binary_suffixes(
    start_server: StartServer, value: str, expected: int
) -> None:
    # Fails without the option (exit 2) or without the field in server.started.
    server = start_server("--max-queue-bytes", value, "--log-level", "info")
    assert server.events("server.started")[0]["max_queue_bytes"] == expected


def test_one_client_too_many_is_rejected_as_server_full(start_server: StartServer) -> None:
    # Fails without --max-clients: the second client would be accepted and chat.
    server = start_server("--max-clients", "1", "--log-level", "info")
    assert server.events("server.started")[0]["max_clients"] == 1
    first = server.connect()
    second = server.raw_connect()
    rejected = server.wait_event("connection.rejected", peer=peer_of(second))
    assert rejected["reason"] == "server_full"
    assert closed_by_server(second) == b""
    assert not [e for e in server.events("connection.accepted") if e["peer"] == rejected["peer"]]
    # The place frees up when the client that had it leaves, and only one place.
    first.sock.close()
    server.wait_closed(first)
    server.connect()  # waits for its connection.accepted
    fourth = server.raw_connect()
    assert server.wait_event("connection.rejected", peer=peer_of(fourth))["reason"] == (
        "server_full"
    )
    assert server.proc.poll() is None


# --------------------------------------------------------------------------
# Per address
# --------------------------------------------------------------------------


def connect_from(server: ServerProcess, source: str) -> socket.socket:
    """A TCP connection to the server from ``source`` (any 127.0.0.0/8 address is loopback)."""
    sock = socket.socket()
    server._clients.append(sock)  # closed at teardown
    sock.settimeout(conftest.WAIT)
    sock.bind((source, 0))
    sock.connect((HOST, server.port))
    return sock


def accepted(server: ServerProcess, sock: socket.socket) -> Event:
    return server.wait_event("connection.accepted", peer=peer_of(sock))


def rejected_as(server: ServerProcess, sock: socket.socket) -> str:
    """The reason of ``sock``'s rejection, once the server closed it without accepting it."""
    reason: str = server.wait_event("connection.rejected", peer=peer_of(sock))["reason"]
    assert closed_by_server(sock) == b""
    assert not [e for e in server.events("connection.accepted") if e["peer"] == peer_of(sock)]
    return reason


def test_one_address_cannot_take_more_than_max_clients_per_addr(start_server: StartServer) -> None:
    # Fails without the option (exit 2), if the fourth client from 127.0.0.1 gets in, if other
    # addresses are held back by 127.0.0.1's count, if a place is not given back when a client
    # leaves, or if the rejections are not counted by their reason.
    server = start_server("--max-clients-per-addr", "3", "--log-level", "info",
                          "--metrics-port", "0")
    first, *others = (connect_from(server, "127.0.0.1") for _ in range(3))
    for sock in (first, *others):
        accepted(server, sock)
    assert rejected_as(server, connect_from(server, "127.0.0.1")) == "per_addr_limit"
    for sock in [connect_from(server, "127.0.0.2") for _ in range(3)]:
        accepted(server, sock)
    first_peer = peer_of(first)
    first.close()
    server.wait_event("connection.closed", peer=first_peer)
    accepted(server, connect_from(server, "127.0.0.1"))
    assert rejected_as(server, connect_from(server, "127.0.0.1")) == "per_addr_limit"
    port = server.events("server.started")[0]["metrics_port"]
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=conftest.WAIT) as r:
        text = r.read().decode()
    assert 'fsmchat_connections_rejected_total{reason="per_addr_limit"} 2.0' in text, text


def test_the_default_per_address_limit_holds(start_server: StartServer) -> None:
    # Without the option one address could take every place (1,008 sockets from one host in
    # 0.02 s locked everyone out). Fails if the default lets one more in than it says.
    server = start_server("--log-level", "info")
    for _ in range(DEFAULT_MAX_CLIENTS_PER_ADDR):
        accepted(server, connect_from(server, "127.0.0.1"))
    assert rejected_as(server, connect_from(server, "127.0.0.1")) == "per_addr_limit"
    accepted(server, connect_from(server, "127.0.0.2"))


# --------------------------------------------------------------------------
# 1,100 clients
# --------------------------------------------------------------------------


@pytest.fixture
def raised_nofile() -> Iterator[int]:
    """Raise this process's soft RLIMIT_NOFILE to >= 2400 (the server inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2400
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"hard RLIMIT_NOFILE is {hard}; this test needs {want}")
    new_soft = max(soft, want) if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    try:
        yield new_soft
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_accepted_or_rejected(server: ServerProcess, count: int) -> tuple[set[str], list[Event]]:
    """Wait until ``count`` clients were accepted or rejected; return accepted peers, rejections."""
    seen: list[Event] = []

    def feed(e: Event) -> bool:
        if e.get("event") in ("connection.accepted", "connection.rejected"):
            seen.append(e)
        return len(seen) >= count

    server.wait_for(feed, 20, f"{count} accepted or rejected connections")
    accepted = {e["peer"] for e in seen if e["event"] == "connection.accepted"}
    rejected = [e for e in seen if e["event"] == "connection.rejected"]
    return accepted, rejected


def test_1100_clients_beyond_max_clients_are_rejected_and_the_rest_chat(
    raised_nofile: int, start_server: StartServer
) -> None:
    # Fails without --max-clients / server_full: at the default of 1008 the server would take
    # clients up to descriptor 1023 and reject fewer than 1100 - max_clients (or, without the
    # fd_limit guard, crash in select() on a descriptor >= 1024). Fails without the new
    # server.started fields (KeyError). Every client is 127.0.0.1: no per-address limit here.
    server = start_server("--log-level", "info", "--max-clients-per-addr", "0")
    started = server.events("server.started")[0]
    max_clients = started["max_clients"]
    assert max_clients == min(FD_SETSIZE, raised_nofile) - 16
    assert started["max_queue_bytes"] == DEFAULT_QUEUE

    total = 1100
    socks = [server.raw_connect() for _ in range(total)]
    by_peer = {peer_of(s): s for s in socks}
    accepted, rejected = wait_accepted_or_rejected(server, total)

    assert len(rejected) == total - max_clients
    assert len(accepted) == max_clients
    assert {e["reason"] for e in rejected} <= {"server_full", "fd_limit"}, rejected[:3]
    rejected_peers = {e["peer"] for e in rejected}
    assert accepted | rejected_peers == set(by_peer)
    assert not accepted & rejected_peers
    assert server.proc.poll() is None

    # Rejected clients see EOF or a reset, and no data.
    for peer in sorted(rejected_peers)[:5]:
        assert closed_by_server(by_peer[peer]) == b""

    # Spot check: accepted clients still chat.
    talker, *listeners = [by_peer[p] for p in sorted(accepted)[:4]]
    talker.sendall(b"one of 1100")
    for sock in listeners:
        assert recv_exactly(sock, 11) == b"one of 1100"

    for sock in socks:
        sock.close()
    assert server.stop() == 0


# --------------------------------------------------------------------------
# A server with 40 descriptors
# --------------------------------------------------------------------------

NOFILE = 40

#: Runs the server with RLIMIT_NOFILE (soft and hard) set to argv[1]: the same as a preexec_fn
#: in Popen, but through ServerProcess (exec keeps the pid, so /proc/PID is the server's).
LAUNCHER = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'fsmchat', *sys.argv[2:]])"
)


@pytest.fixture
def start_limited(start_server: StartServer, monkeypatch: pytest.MonkeyPatch) -> StartServer:
    """start_server, with the server process under RLIMIT_NOFILE = (40, 40)."""

    def command(*args: str) -> list[str]:
        return [sys.executable, "-c", LAUNCHER, str(NOFILE), *args]

    monkeypatch.setattr(conftest, "server_command", command)
    return start_server


def test_under_40_descriptors_the_default_max_clients_rejects_as_server_full(
    start_limited: StartServer,
) -> None:
    # Fails without the default derived from RLIMIT_NOFILE (max_clients != 24): the server would
    # take clients until accept fails with EMFILE and the extra ones would wait, not be rejected.
    server = start_limited("--log-level", "info")
    started = server.events("server.started")[0]
    assert started["max_clients"] == NOFILE - 16

    first, second = server.connect_many(2)
    rest = [server.raw_connect() for _ in range(78)]
    accepted, rejected = wait_accepted_or_rejected(server, 80)
    assert len(accepted) == NOFILE - 16
    assert len(rejected) == 80 - (NOFILE - 16)
    assert {e["reason"] for e in rejected} == {"server_full"}
    assert not server.events("accept.failed")

    first.sock.sendall(b"hello, 1")
    assert recv_exactly(second.sock, 8) == b"hello, 1"

    rejected_peers = {e["peer"] for e in rejected}
    for sock in rest:
        if peer_of(sock) in rejected_peers:
            assert closed_by_server(sock) == b""
    assert server.proc.poll() is None


def test_out_of_descriptors_accept_rests_instead_of_spinning(start_limited: StartServer) -> None:
    # Fails if accept were retried on every turn while EMFILE lasts: the server would use a
    # whole core (CPU >= 30%). Fails if accept.failed were logged per retry rather than once
    # per episode (more than 3 in the window). Fails without accept.resumed, or if closing
    # clients did not let the waiting ones in.
    server = start_limited("--log-level", "info", "--max-clients", "100")
    assert server.events("server.started")[0]["max_clients"] == 100

    first, second = server.connect_many(2)
    rest = [server.raw_connect() for _ in range(78)]
    failed = server.wait_event("accept.failed")
    assert "EMFILE" in failed["error"], failed
    assert isinstance(failed["retry_in"], int | float) and failed["retry_in"] > 0, failed

    # A one-second window with 80 clients connected, part of them waiting in the backlog.
    def chat_goes_on() -> None:
        first.sock.sendall(b"hello while out of descriptors")
        assert recv_exactly(second.sock, 30) == b"hello while out of descriptors"

    cpu = cpu_share_during(server, chat_goes_on)
    assert cpu < 0.30, f"server used {cpu:.0%} of a core while out of descriptors"
    assert 1 <= len(server.events("accept.failed")) <= 3, server.events("accept.failed")
    assert not server.events("accept.resumed")

    accepted = {e["peer"] for e in server.events("connection.accepted")}
    waiting = [s for s in rest if peer_of(s) not in accepted]
    assert waiting, "every client got in: the descriptor limit was not reached"
    assert not server.events("connection.rejected")

    # Ten clients leave; ten waiting ones take their descriptors.
    leaving = [s for s in rest if peer_of(s) in accepted][:10]
    assert len(leaving) == 10
    for sock in leaving:
        sock.close()
    resumed = server.wait_event("accept.resumed")
    assert isinstance(resumed["failures"], int) and resumed["failures"] >= 1, resumed
    waiting_peers = {peer_of(s) for s in waiting}
    newcomers = wait_event_count(
        server,
        "connection.accepted",
        10,
        predicate=lambda e: e["peer"] in waiting_peers,
    )
    newcomer = next(s for s in waiting if peer_of(s) == newcomers[0]["peer"])
    first.sock.sendall(b"welcome")
    assert recv_exactly(newcomer, 7) == b"welcome"
    assert recv_exactly(second.sock, 7) == b"welcome"
    assert server.proc.poll() is None


def cpu_share_during(server: ServerProcess, action: Callable[[], None],
                     window: float = 1.0) -> float:
    """The server's CPU (share of a core) over ``window`` seconds that start with ``action``."""
    ticks_before = proc_cpu_ticks(server.pid)
    start = time.monotonic()
    action()
    time.sleep(max(0.0, window - (time.monotonic() - start)))  # the measuring window itself
    ticks = proc_cpu_ticks(server.pid) - ticks_before
    return ticks / CLOCK_TICKS / (time.monotonic() - start)


def test_out_of_descriptors_a_waiting_scraper_does_not_make_it_spin(
    start_limited: StartServer,
) -> None:
    # Fails if the metrics listener stayed in the read set while accept fails with EMFILE: a
    # scraper waiting in its backlog would keep it readable, and every turn would fail again.
    server = start_limited("--log-level", "info", "--max-clients", "100", "--metrics-port", "0")
    metrics_port = int(server.events("server.started")[0]["metrics_port"])
    [server.raw_connect() for _ in range(60)]
    server.wait_event("accept.failed")
    scraper = socket.create_connection((HOST, metrics_port))
    try:
        cpu = cpu_share_during(server, lambda: scraper.sendall(b"GET /metrics HTTP/1.1\r\n"))
        assert cpu < 0.30, f"server used {cpu:.0%} of a core with a scraper waiting"
        assert len(server.events("accept.failed")) == 1
    finally:
        scraper.close()
