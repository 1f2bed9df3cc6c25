"""The test harness's TCP proxy (tests/tcp_proxy.py): what it forwards, how it cuts, how it heals.

Each test puts a ``TcpProxy`` between a socket of the test and a listener of the test (or a real
Redis, or an fsmchat instance's links and a real Redis), so both ends of every proxied connection
are seen.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest
from conftest import (
    HOST,
    QUIET,
    WAIT,
    BackgroundReader,
    StartServer,
    assert_nothing_arrives,
    recv_exactly,
    wait_event_count,
)
from redis_harness import RedisServer, bug_free
from tcp_proxy import ProxyFactory, TcpProxy
from test_redis import on_link
from test_streams import RAW_LINKS

pytest_plugins = ["redis_harness", "tcp_proxy"]


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    yield from bug_free(start_server)


@pytest.fixture
def target() -> Iterator[socket.socket]:
    """A listener of the test's, for the proxy to forward to."""
    listener = socket.create_server((HOST, 0))
    listener.settimeout(WAIT)
    yield listener
    listener.close()


def through(proxy: TcpProxy, target: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connection through the proxy: (the client's end, the target's accepted end)."""
    client = socket.create_connection((HOST, proxy.port), timeout=WAIT)
    server, _ = target.accept()
    server.settimeout(WAIT)
    return client, server


def broken(sock: socket.socket) -> bool:
    """The connection ended: an end of file or a reset (and nothing came before it)."""
    sock.settimeout(WAIT)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True
    assert data == b"", f"data instead of the end: {data[:80]!r}"
    return True


def no_connection(listener: socket.socket) -> None:
    """Nobody is waiting to be accepted on ``listener`` (a negative check, after a proof)."""
    readable, _, _ = select.select([listener], [], [], QUIET)
    assert not readable, "the proxy connected onwards"


def test_bytes_pass_both_ways_unchanged_and_a_slow_reader_loses_nothing(
        tcp_proxy: ProxyFactory, target: socket.socket) -> None:
    proxy = tcp_proxy(*target.getsockname()[:2])
    assert proxy.url == f"redis://{HOST}:{proxy.port}"
    client, server = through(proxy, target)
    client.sendall(b"hello\r\n")
    assert recv_exactly(server, 7) == b"hello\r\n"
    server.sendall(b"+PONG\r\n")
    assert recv_exactly(client, 7) == b"+PONG\r\n"
    # More than the proxy buffers each way, both ways at once: flow control, not loss.
    up, down = os.urandom(5 * 1024 * 1024), os.urandom(5 * 1024 * 1024)
    got_up, got_down = BackgroundReader(server, len(up)), BackgroundReader(client, len(down))
    client.sendall(up)
    server.sendall(down)
    assert got_up.result() == up
    assert got_down.result() == down
    assert proxy.bytes_up == 7 + len(up) and proxy.bytes_down == 7 + len(down)
    # An end of file on one side ends the pair: the other side sees it too.
    client.close()
    assert broken(server)
    proxy.wait(lambda: not proxy.pairs, "pair closed")
    server.close()


def test_a_cut_resets_both_sides_refuses_new_connections_and_restore_accepts_again(
        tcp_proxy: ProxyFactory, target: socket.socket) -> None:
    proxy = tcp_proxy(*target.getsockname()[:2])
    pairs = [through(proxy, target) for _ in range(3)]
    for client, server in pairs:
        client.sendall(b"ping")
        assert recv_exactly(server, 4) == b"ping"
    proxy.cut()
    assert proxy.connections == 0
    for client, server in pairs:
        with pytest.raises(ConnectionResetError):  # an RST, not a FIN
            client.recv(1)
        with pytest.raises(ConnectionResetError):
            server.recv(1)
        client.close()
        server.close()

    refused = socket.socket()
    refused.settimeout(WAIT)
    try:  # accepted, then reset: the reset can come before the connect is seen to succeed
        refused.connect((HOST, proxy.port))
        reset_at_connect = False
    except ConnectionResetError:
        reset_at_connect = True
    proxy.wait(lambda: proxy.refused == 1, "refused connection")
    assert reset_at_connect or broken(refused)
    refused.close()
    no_connection(target)

    proxy.restore()
    client, server = through(proxy, target)
    client.sendall(b"back")
    assert recv_exactly(server, 4) == b"back"
    server.sendall(b"again")
    assert recv_exactly(client, 5) == b"again"
    client.close()
    server.close()


def test_a_blackhole_forwards_nothing_closes_nothing_and_restore_delivers_what_waited(
        tcp_proxy: ProxyFactory, target: socket.socket) -> None:
    proxy = tcp_proxy(*target.getsockname()[:2])
    client, server = through(proxy, target)
    proxy.blackhole()
    client.sendall(b"into the void")
    server.sendall(b"and back")
    held = socket.create_connection((HOST, proxy.port), timeout=WAIT)
    proxy.wait(lambda: proxy.accepted == 2, "held connection")
    held.sendall(b"held")
    assert_nothing_arrives(server)
    assert_nothing_arrives(client)
    no_connection(target)
    assert proxy.connections == 2 and proxy.bytes_up == 0 and proxy.bytes_down == 0

    proxy.restore()  # the cable is back: what waited goes through, the held one is dialled
    assert recv_exactly(server, 13) == b"into the void"
    assert recv_exactly(client, 8) == b"and back"
    late, _ = target.accept()
    late.settimeout(WAIT)
    assert recv_exactly(late, 4) == b"held"
    # A cut after a blackhole resets everything, held or not.
    proxy.cut()
    for sock in (client, server, held, late):
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        sock.close()


def test_a_target_that_is_not_there_resets_the_client(tcp_proxy: ProxyFactory) -> None:
    with socket.create_server((HOST, 0)) as gone:
        port = gone.getsockname()[1]
    proxy = tcp_proxy(HOST, port)
    client = socket.create_connection((HOST, proxy.port), timeout=WAIT)
    assert broken(client)
    client.close()
    proxy.wait(lambda: proxy.connections == 0, "connection dropped")


def test_an_instance_on_the_proxy_loses_its_links_at_the_cut_and_gets_them_back_at_restore(
        tcp_proxy: ProxyFactory, start_server: StartServer, redis_server: RedisServer) -> None:
    proxy = tcp_proxy(redis_server.host, redis_server.port)
    server = start_server("--redis", proxy.url)
    for link in RAW_LINKS:
        wait_event_count(server, "redis.connected", 1, WAIT, on_link(link))
    assert proxy.connections == len(RAW_LINKS)
    proxy.cut()
    # The RSTs end every link at once, not after a timeout of the link's.
    for link in RAW_LINKS:
        (lost,) = wait_event_count(server, "redis.disconnected", 1, 2.0, on_link(link))
        assert "no answer" not in str(lost["error"]), lost
    proxy.wait(lambda: proxy.refused >= 1, "a redial refused while cut")
    proxy.restore()
    for link in RAW_LINKS:
        wait_event_count(server, "redis.connected", 2, WAIT, on_link(link))
    client = server.connect()
    assert redis_server.publish("fsmchat", b"to the client") == 1  # resubscribed, through it
    assert recv_exactly(client.sock, 13) == b"to the client"
