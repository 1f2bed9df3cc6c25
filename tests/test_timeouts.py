"""Timeouts: --idle-timeout, --handshake-timeout, their cost when nothing happens, keepalive.

Durations are measured on the server's own clock, from the ``timestamp`` of its events (an
accept, a receive, a close), so a slow test process does not blur them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    CLOCK_TICKS,
    HOST,
    Client,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    closed_by_server,
    proc_cpu_ticks,
    recv_exactly,
    recv_until_eof,
    run_cli,
    usage_error,
    wait_event_count,
)
from tls_certs import (
    Sockets,
    TlsFiles,
    accepted_client,
    client_context,
    connect_plain,
    connect_tls,
    make_tls_files,
    timestamp,
    tls_args,
    tls_port_of,
)

from fsmchat.acceptor import CLIENT_OPTIONS, ClientOptions
from fsmchat.options import MAX_SECONDS

#: Slack on the server's timers: a timer may fire this much early (clock granularity) ...
EARLY = 0.05
#: ... and this much late (a loaded test machine).
LATE = 1.5


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    jar = Sockets()
    yield jar
    jar.close()


def seconds_between(server: ServerProcess, client: Client, start: float, name: str) -> float:
    """Server-clock seconds from ``start`` (a timestamp) to ``client``'s first ``name`` event."""
    return timestamp(server.wait_connection_event(client, name)) - start


def accepted_at(server: ServerProcess, client: Client) -> float:
    return timestamp(server.events()[client.accepted_index])


def ping_pong(a: Client, b: Client, round_no: int) -> None:
    """One round trip: a speaks, b hears it and answers, a hears the answer."""
    ping, pong = f"ping {round_no}\n".encode(), f"pong {round_no}\n".encode()
    a.sock.sendall(ping)
    assert recv_exactly(b.sock, len(ping)) == ping
    b.sock.sendall(pong)
    assert recv_exactly(a.sock, len(pong)) == pong


# --------------------------------------------------------------------------
# --idle-timeout
# --------------------------------------------------------------------------


def test_idle_timeout_closes_silent_clients_and_spares_active_ones(
    start_server: StartServer, sockets: Sockets
) -> None:
    # ``silent`` never sends (it only receives the others' chat): closed after 1 s. ``late``
    # sends once, some rounds in: closed 1 s after that message, not after its accept. The
    # pair keeps talking for well over the timeout and stays. Fails if silence is measured
    # from the accept, if receiving counts as activity, if active clients are closed, or if
    # the close comes without connection.idle / reason idle_timeout.
    timeout = 1.0
    server = start_server("--idle-timeout", str(timeout))
    silent = connect_plain(server, sockets)
    late = connect_plain(server, sockets)
    a, b = (connect_plain(server, sockets) for _ in range(2))
    start = time.monotonic()
    rounds = 0
    gaps: list[float] = []
    last_send = start
    late_message = b"late but here\n"
    while time.monotonic() - start < 3 * timeout:
        ping_pong(a, b, rounds)
        rounds += 1
        now = time.monotonic()
        gaps.append(now - last_send)
        last_send = now
        if rounds == 3:
            late.sock.sendall(late_message)
            for listener in (a, b):
                assert recv_exactly(listener.sock, len(late_message)) == late_message
        # Think time between round trips: each client speaks every ~0.2 s, well inside the
        # timeout. (Nothing to await here: the point is that time passes.)
        time.sleep(timeout / 5)
    assert max(gaps) < timeout * 0.8, f"the test itself paused too long between sends: {gaps}"

    for quiet in (silent, late):
        closed = server.wait_closed(quiet)
        assert closed["reason"] == "idle_timeout", closed
        idle = server.connection_events(quiet, "connection.idle")
        assert len(idle) == 1 and idle[0]["level"] == "warning", idle
        assert idle[0]["peer"] == quiet.peer, idle
        closed_by_server(quiet.sock)  # the chat it received, then EOF

    silent_for = seconds_between(server, silent, accepted_at(server, silent),
                                 "connection.closed")
    assert timeout - EARLY <= silent_for <= timeout + LATE, silent_for
    heard = timestamp(server.wait_connection_event(late, "data.received"))
    late_for = seconds_between(server, late, heard, "connection.closed")
    assert timeout - EARLY <= late_for <= timeout + LATE, late_for

    for active in (a, b):
        assert not server.connection_events(active, "connection.closed"), active
        assert not server.connection_events(active, "connection.idle"), active
    ping_pong(a, b, rounds)
    assert_nothing_arrives(a.sock)


def test_a_client_held_back_by_its_receive_rate_is_not_idle(
    start_server: StartServer, sockets: Sockets
) -> None:
    # A sender over --max-recv-rate is not read for a while, but it is not silent: its bytes
    # wait in the kernel. With 16 KiB/s and 64 KiB in one go it waits about 3 s for credit,
    # longer than the 1 s idle timeout. Fails if the idle timer closes it meanwhile (reason
    # idle_timeout) instead of reading its bytes when the rate allows.
    server = start_server("--idle-timeout", "1", "--max-recv-rate", "16K")
    sender, receiver = (connect_plain(server, sockets) for _ in range(2))
    payload = bytes(i % 251 for i in range(96 * 1024))
    sender.sock.sendall(payload)
    server.wait_connection_event(sender, "connection.limited")
    # The receiver must keep talking too, or it is idle itself.
    got = bytearray()
    deadline = time.monotonic() + 20
    while len(got) < len(payload) and time.monotonic() < deadline:
        receiver.sock.sendall(b".")
        receiver.sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            got += receiver.sock.recv(65536)
        closed = server.connection_events(sender, "connection.closed")
        assert not closed, f"the limited sender was closed: {closed}"
    assert bytes(got) == payload
    assert not server.connection_events(sender, "connection.closed")


def test_no_idle_timeout_by_default(start_server: StartServer, sockets: Sockets) -> None:
    # Fails if a default server closes silent clients (default 0 = off) within 1.5 s.
    server = start_server()
    silent, a, b = (connect_plain(server, sockets) for _ in range(3))
    time.sleep(1.5)  # the absence of a close can only be shown by letting time pass
    ping_pong(a, b, 0)
    assert recv_exactly(silent.sock, 14) == b"ping 0\npong 0\n"
    assert not server.events("connection.closed")


# --------------------------------------------------------------------------
# --handshake-timeout
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_stalled_handshakes_are_closed_at_the_handshake_timeout(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # ``mute`` connects to the TLS port and sends nothing; ``stuck`` sends half a ClientHello
    # record and stops. Both are closed after 1 s (tls_error warning, reason
    # handshake_timeout); a TLS client whose handshake finished long before that, and a
    # plain client, chat on throughout. Fails if a stalled handshake is never closed, is
    # closed early, blocks the loop, or if the handshake timeout also hits secured clients.
    timeout = 1.0
    server = start_server(*tls_args(files), "--handshake-timeout", str(timeout))
    port = tls_port_of(server)
    tls_client = connect_tls(server, sockets, client_context(files), port)
    plain = connect_plain(server, sockets)
    mute = accepted_client(server, sockets.open(port))
    stuck = accepted_client(server, sockets.open(port))
    stuck.sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32))

    ping_pong(tls_client, plain, 0)  # while the two are stalled
    for stalled in (mute, stuck):
        error = server.wait_connection_event(stalled, "connection.tls_error")
        assert error["level"] == "warning" and error["peer"] == stalled.peer, error
        assert isinstance(error["error"], str) and error["error"], error
        closed = server.wait_closed(stalled)
        assert closed["reason"] == "handshake_timeout", closed
        took = timestamp(closed) - accepted_at(server, stalled)
        assert timeout - EARLY <= took <= timeout + LATE, took
        assert not server.connection_events(stalled, "connection.secured")
        states = [e["to"] for e in server.connection_events(stalled, "connection.state")]
        assert "handshaking" in states and "reading" not in states, states
        assert recv_until_eof(stalled.sock) == b""

    # The TLS client, accepted before the stalled ones, has been in for over the timeout.
    ping_pong(tls_client, plain, 1)
    late = connect_tls(server, sockets, client_context(files), port)
    ping_pong(late, tls_client, 2)
    assert recv_exactly(plain.sock, 14) == b"ping 2\npong 2\n"
    for client in (tls_client, plain, late):
        assert not server.connection_events(client, "connection.closed")


# --------------------------------------------------------------------------
# Cost when nothing happens, and keepalive
# --------------------------------------------------------------------------


def test_500_idle_connections_with_an_idle_timeout_cost_almost_no_cpu(
    start_server: StartServer, sockets: Sockets
) -> None:
    # With --idle-timeout on, 500 silent connections must not make the loop wake up often
    # (a short periodic tick, or a scan of every connection on each turn). Fails if the
    # server uses 2% of a core or more over 3 s while nothing happens (measured: 0 ticks).
    count = 500
    server = start_server("--idle-timeout", "60", "--log-level", "info",
                          "--max-clients-per-addr", "0")  # all from 127.0.0.1
    for _ in range(count):
        sockets.open(server.port)
    wait_event_count(server, "connection.accepted", count, timeout=30)
    before = proc_cpu_ticks(server.pid)
    started = time.monotonic()
    time.sleep(3.0)  # CPU use over an interval: the interval has to pass
    ticks = proc_cpu_ticks(server.pid) - before
    cpu = ticks / CLOCK_TICKS / (time.monotonic() - started)
    assert cpu < 0.02, f"server used {cpu:.1%} of a core with {count} idle connections"
    assert not server.events("connection.closed")
    a, b = (connect_plain(server, sockets) for _ in range(2))
    ping_pong(a, b, 0)


def tcp_timer(pid: int, local_port: int, remote_port: int) -> tuple[int, float]:
    """The kernel's timer on the server's side of a loopback connection: (kind, seconds left).

    From /proc/PID/net/tcp: kind 2 is the keepalive timer, 0 none.
    """
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.split(":")[1], 16) == local_port
            and int(remote.split(":")[1], 16) == remote_port
        ):
            kind, when = fields[5].split(":")
            return int(kind, 16), int(when, 16) / CLOCK_TICKS
    raise AssertionError(f"no connection {local_port} <- {remote_port} in /proc/net/tcp")


def test_accepted_sockets_have_tcp_keepalive(start_server: StartServer, sockets: Sockets) -> None:
    # A peer that vanishes without FIN or RST is found by TCP keepalive. Fails if the server's
    # side of an idle connection has no keepalive timer (SO_KEEPALIVE off), or if its first
    # probe is due after more than 30 minutes (TCP_KEEPIDLE left at Linux's two hours).
    if not os.path.exists("/proc/self/net/tcp"):
        pytest.skip("no /proc/net/tcp here")
    # Every one of several: the first is checked, the later ones trust their listener's options.
    server = start_server()
    for _ in range(3):
        client = connect_plain(server, sockets)
        kind, left = tcp_timer(server.pid, server.port, client.sock.getsockname()[1])
        assert kind == 2, f"timer kind {kind}: no keepalive timer on the server's socket"
        assert 10 <= left <= 1800, f"first keepalive probe in {left:.0f} s"


def accepted_from(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(accepted, client) of one loopback connection to ``listener``."""
    client = socket.create_connection(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    return accepted, client


def options_of(sock: socket.socket) -> list[int]:
    return [sock.getsockopt(level, option) for level, option, _ in CLIENT_OPTIONS]


def test_client_sockets_get_their_options_from_the_listener_or_one_by_one() -> None:
    # No Nagle and keepalive on every client socket, without five setsockopt calls per
    # connection where the listener's options come with its sockets (Linux). Fails if a socket
    # ends up without the options: taken from a listener that did not pass them on, trusted
    # wrongly, or never set.
    wanted = [value for _, _, value in CLIENT_OPTIONS]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        options = ClientOptions(listener)
        for _ in range(3):
            accepted, client = accepted_from(listener)
            with accepted, client:
                options.apply(accepted)
                assert options_of(accepted) == wanted
        assert options.inherited is True, "Linux passes a listener's options on"
        options = ClientOptions(listener)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # one not passed on
        for _ in range(2):
            accepted, client = accepted_from(listener)
            with accepted, client:
                options.apply(accepted)
                assert options_of(accepted) == wanted
        assert options.inherited is False
    unix, other = socket.socketpair()  # not TCP: nothing to set, nothing fails
    with unix, other:
        ClientOptions().apply(unix)


# --------------------------------------------------------------------------
# How long a duration may be
# --------------------------------------------------------------------------

DURATIONS = ("--idle-timeout", "--handshake-timeout", "--drain-timeout", "--stats-interval")


@pytest.mark.parametrize("option", DURATIONS)
@pytest.mark.parametrize("value", ["1e10", "inf", "31536000.5"])
def test_a_duration_past_a_year_exits_2_with_one_line(option: str, value: str) -> None:
    # 1e10 s was taken and crashed the server later, with an OverflowError from select (at the
    # first client, the first TLS client, a SIGTERM while draining, or at once). Fails if any
    # of them is accepted (run_cli then times out on a server that runs) or fails otherwise.
    assert float(value) > MAX_SECONDS
    line = usage_error(run_cli("--host", HOST, "--port", "0", option, value), option)
    assert str(MAX_SECONDS) in line, line


def test_the_longest_durations_serve_a_tls_and_a_plain_client_and_stop(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # The bound itself must be safe: with every duration at a year, a TLS client (handshake
    # timer) and a plain one (idle timer) chat, a stop with a client still connected drains
    # (drain timer) and the server exits 0. Fails on a crash at any of those timers.
    longest = str(MAX_SECONDS)
    server = start_server(*tls_args(files), *(arg for option in DURATIONS
                                              for arg in (option, longest)))
    tls_client = connect_tls(server, sockets, client_context(files), tls_port_of(server))
    plain = connect_plain(server, sockets)
    ping_pong(tls_client, plain, 1)
    assert server.stop() == 0, server.describe()
    assert server.events("server.stopped"), server.describe()
