"""Access lists: --allow and --deny by the client's source address.

Clients pick their source address with ``bind(("127.0.0.N", 0))`` before ``connect``: every
127.0.0.0/8 address is the loopback on Linux. A refused client is accepted and closed at once
(``connection.rejected``, reason ``denied``): it never gets ``connection.accepted`` and nothing
it sends reaches the chat, while the admitted clients chat on.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterator

import pytest
from conftest import (
    HOST,
    Client,
    Event,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    closed_by_server,
    peer_of,
    recv_exactly,
    recv_until_eof,
    run_cli,
    usage_error,
)
from tls_certs import Sockets, connect_plain


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    jar = Sockets()
    yield jar
    jar.close()


@functools.cache
def help_text() -> str:
    result = run_cli("--help")
    assert result.returncode == 0, result
    return result.stdout


def refused(
    server: ServerProcess, sockets: Sockets, source: str, message: bytes = b""
) -> Event:
    """Connect from ``source`` (sending ``message`` at once if given): the server must refuse.

    Returns the ``connection.rejected`` event after checking that the server closed the
    connection and never accepted it. Without ``message`` the close must be a clean EOF;
    with one, the kernel may answer the unread bytes with a reset instead.
    """
    sock = sockets.open(server.port, source)
    if message:
        sock.sendall(message)
    peer = peer_of(sock)
    rejected = server.wait_event("connection.rejected", peer=peer)
    assert rejected["reason"] == "denied", rejected
    assert rejected["level"] == "warning", rejected
    if message:
        assert closed_by_server(sock) == b""
    else:
        assert recv_until_eof(sock) == b"", "a refused client must get nothing but EOF"
    assert not [e for e in server.events("connection.accepted") if e["peer"] == peer]
    return rejected


def connect_from(server: ServerProcess, sockets: Sockets, sources: list[str]) -> list[Client]:
    """One admitted client from each of ``sources``, in order."""
    clients = [connect_plain(server, sockets, source=source) for source in sources]
    for client, source in zip(clients, sources, strict=True):
        assert client.peer.startswith(f"{source}:"), (client.peer, source)
    return clients


def chat(clients: list[Client]) -> None:
    """Each client's message reaches every other one, byte for byte, and nothing else does.

    Connect the clients before the refused ones: anything a refused client got into the chat
    would be queued for them first and show up here as unexpected bytes.
    """
    for index, sender in enumerate(clients):
        message = f"message {index} from {sender.peer}\n".encode()
        sender.sock.sendall(message)
        for receiver in clients:
            if receiver is not sender:
                assert recv_exactly(receiver.sock, len(message)) == message
    for client in clients:
        assert_nothing_arrives(client.sock)


def test_denied_address_is_refused_while_others_chat(
    start_server: StartServer, sockets: Sockets
) -> None:
    # Fails without --deny (the 127.0.0.2 clients would be accepted), if a denied client gets
    # connection.accepted, if what it sent reaches anyone, or if the deny list catches more
    # than the one address (127.0.0.3 must get in).
    server = start_server("--deny", "127.0.0.2/32")
    clients = connect_from(server, sockets, ["127.0.0.1", "127.0.0.3", "127.0.0.1"])
    refused(server, sockets, "127.0.0.2")
    refused(server, sockets, "127.0.0.2", b"from a denied address\n")
    chat(clients)
    assert server.proc.poll() is None


@pytest.mark.parametrize("rule", ["127.0.0.1/32", "::ffff:127.0.0.1"])
def test_with_allow_only_allowed_addresses_get_in(
    start_server: StartServer, sockets: Sockets, rule: str
) -> None:
    # Fails if an --allow list does not shut out the addresses it does not name, or if the
    # rule written in the IPv4-mapped form matches nobody (127.0.0.1 would be refused).
    server = start_server("--allow", rule)
    clients = connect_from(server, sockets, ["127.0.0.1", "127.0.0.1"])
    refused(server, sockets, "127.0.0.3")
    refused(server, sockets, "127.0.0.3", b"not allowed in\n")
    chat(clients)


def test_deny_wins_over_allow(start_server: StartServer, sockets: Sockets) -> None:
    # 127.0.0.2 is in both allow entries and in the deny list: it is refused. 127.0.0.3 is
    # allowed by the /8 alone and must get in. Fails if allow is checked first (or alone).
    server = start_server(
        "--allow", "127.0.0.0/8", "--allow", "127.0.0.2/32", "--deny", "127.0.0.2/32"
    )
    clients = connect_from(server, sockets, ["127.0.0.1", "127.0.0.3"])
    refused(server, sockets, "127.0.0.2")
    chat(clients)


def test_bare_addresses_are_single_hosts_and_options_repeat(
    start_server: StartServer, sockets: Sockets
) -> None:
    # A bare address is a /32: 127.0.0.1 must not let the rest of 127.0.0.0/8 in, and a bare
    # --deny must not catch its neighbours. Both --allow entries count, not only the last.
    server = start_server(
        "--allow", "127.0.0.1", "--allow", "127.0.0.3", "--allow", "127.0.0.4",
        "--deny", "127.0.0.4",
    )
    clients = connect_from(server, sockets, ["127.0.0.1", "127.0.0.3"])
    for source in ("127.0.0.2", "127.0.0.4", "127.0.0.5"):
        refused(server, sockets, source)
    chat(clients)


def ipv6_loopback() -> bool:
    """Whether this host can use ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_ipv4_clients_on_a_dual_stack_listener_are_matched_as_ipv4(
    start_server: StartServer, sockets: Sockets
) -> None:
    # Without --host the listener takes IPv6 and IPv4: an IPv4 client arrives as
    # ::ffff:127.0.0.2 and must still match 127.0.0.2/32. Fails if IPv4-mapped addresses are
    # compared as IPv6 (the denied client would get in) or if ::1/128 does not match ::1.
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    server = start_server("--port", "0", "--deny", "127.0.0.2/32", "--deny", "::1/128",
                          started=False)
    server.port = int(server.wait_event("server.started")["port"])
    clients = connect_from(server, sockets, ["127.0.0.1", "127.0.0.3"])
    refused(server, sockets, "127.0.0.2")
    v6 = sockets.open(server.port, host="::1")
    v6_peer = f"[::1]:{v6.getsockname()[1]}"
    rejected = server.wait_event("connection.rejected", peer=v6_peer)
    assert rejected["reason"] == "denied", rejected
    assert recv_until_eof(v6) == b""
    chat(clients)


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4 listener", "dual-stack"])
def test_rules_in_the_ipv4_mapped_form_match_ipv4_clients(
    start_server: StartServer, sockets: Sockets, dual_stack: bool
) -> None:
    # ::ffff:127.0.0.2 is 127.0.0.2 written as IPv6, and ::ffff:127.0.0.0/120 is 127.0.0.0/24:
    # both must refuse clients from there, whether the listener is IPv4 (the client arrives
    # as 127.0.0.2) or dual-stack (it may arrive as ::ffff:127.0.0.2). Fails if mapped rules
    # are compared as IPv6 only: they would then never match, and the denied clients get in.
    where = ["--port", "0"] if dual_stack else ["--port", "0", "--host", HOST]
    server = start_server(*where, "--deny", "::ffff:127.0.0.2",
                          "--deny", "::ffff:127.0.1.0/120", started=False)
    server.port = int(server.wait_event("server.started")["port"])
    clients = connect_from(server, sockets, ["127.0.0.1", "127.0.0.3"])
    refused(server, sockets, "127.0.0.2")
    refused(server, sockets, "127.0.1.9")
    chat(clients)


def test_deny_of_the_whole_ipv4_mapped_block_keeps_every_ipv4_client_out(
    start_server: StartServer, sockets: Sockets
) -> None:
    # ::ffff:0:0/96 is every IPv4 address written as IPv6. Fails if it matches nobody.
    server = start_server("--deny", "::ffff:0:0/96")
    for source in ("127.0.0.1", "127.0.0.5"):
        refused(server, sockets, source)


@pytest.mark.parametrize(
    "args",
    [
        ["--allow", "127.0.0.1/33"],
        ["--allow", "300.1.2.3/8"],
        ["--deny", "banana"],
        ["--deny", "::1/129"],
        ["--deny", "127.0.0.1/"],
        ["--allow", "127.0.0.1", "--deny", "10.0.0.0/x"],
    ],
    ids=" ".join,
)
def test_bad_cidr_exits_2_with_one_line_naming_the_option(args: list[str]) -> None:
    # Without the options argparse would also exit 2 with one line ("unrecognized
    # arguments"), so --help must list both first. The bad value is always the last one.
    option = args[-2]
    assert "--allow" in help_text() and "--deny" in help_text()
    usage_error(run_cli("--port", "0", "--host", HOST, *args, timeout=10), option)
