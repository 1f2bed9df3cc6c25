"""TLS: a TLS listener beside the plain one (one chat), mutual TLS, and what TLS hides from select.

The clients use the ssl module in blocking mode with timeouts, except :class:`BioClient`, which
encrypts into memory so that the test decides how the bytes are cut into TCP writes.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    HOST,
    BackgroundReader,
    Client,
    MiB,
    ServerProcess,
    StartServer,
    StreamReader,
    assert_nothing_arrives,
    closed_by_server,
    free_port,
    proc_fd_count,
    recv_exactly,
    reset,
    run_cli,
)
from tls_certs import (
    CLIENT_NAME,
    SERVER_NAME,
    Sockets,
    TlsFiles,
    accepted_client,
    client_context,
    connect_plain,
    connect_tls,
    make_tls_files,
    refused_by_server,
    tls_args,
    tls_port_of,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    jar = Sockets()
    yield jar
    jar.close()


def relay(sender: Client, receivers: list[Client], message: bytes) -> None:
    """``sender`` sends ``message``; every receiver gets exactly it (nothing before it)."""
    sender.sock.sendall(message)
    for receiver in receivers:
        assert recv_exactly(receiver.sock, len(message)) == message


def chat(clients: list[Client], tag: str) -> None:
    """Each client speaks once; every other one gets exactly that, then nothing more."""
    for index, sender in enumerate(clients):
        relay(sender, [c for c in clients if c is not sender], f"{tag} {index}\n".encode())
    for client in clients:
        assert_nothing_arrives(client.sock)


def assert_tls_failure(server: ServerProcess, client: Client, reason: str = "tls_error") -> None:
    """The server logged a tls_error warning for the client and closed it with ``reason``."""
    error = server.wait_connection_event(client, "connection.tls_error")
    assert error["level"] == "warning", error
    assert error["peer"] == client.peer, error
    assert isinstance(error["error"], str) and error["error"], error
    closed = server.wait_closed(client)
    assert closed["reason"] == reason, closed
    assert not server.connection_events(client, "connection.secured")


# --------------------------------------------------------------------------
# Listeners and events
# --------------------------------------------------------------------------


def test_server_started_tells_whether_and_where_tls_is_served(
    start_server: StartServer, files: TlsFiles
) -> None:
    # server.started: ``tls`` says whether ``port`` speaks TLS (README), ``tls_port`` names a
    # TLS listener beside it. Fails if either is missing or wrong.
    plain = start_server().wait_event("server.started")
    assert plain["tls"] is False, plain
    assert plain.get("tls_port") is None, plain

    beside = start_server(*tls_args(files)).wait_event("server.started")
    assert beside["tls"] is False, beside
    assert isinstance(beside["tls_port"], int) and beside["tls_port"] not in (0, beside["port"])

    itself = start_server(*tls_args(files, tls_port=False)).wait_event("server.started")
    assert itself["tls"] is True, itself
    assert itself.get("tls_port") is None, itself


def test_tls_and_plain_clients_are_one_chat_both_ways(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # Fails if the TLS listener is a separate chat, if bytes are lost or changed between a TLS
    # and a plain client (either way, small and 1 MiB), or if the events lack the TLS fields.
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    context = client_context(files)
    tls_a = connect_tls(server, sockets, context, port)
    plain = connect_plain(server, sockets)
    tls_b = connect_tls(server, sockets, context, port)

    for client, tls in ((tls_a, True), (plain, False), (tls_b, True)):
        accepted = server.events()[client.accepted_index]
        assert accepted["tls"] is tls, accepted
    secured = server.connection_events(tls_a, "connection.secured")[0]
    assert secured["level"] == "info", secured
    assert secured["peer"] == tls_a.peer, secured
    assert secured["version"] in ("TLSv1.2", "TLSv1.3"), secured
    assert isinstance(secured["cipher"], str) and secured["cipher"], secured
    assert secured["subject"] is None, secured  # no client certificates asked for
    assert not server.connection_events(plain, "connection.secured")
    # A TLS client is ``handshaking`` between its accept and the chat; a plain one never is.
    tls_states = [e["to"] for e in server.connection_events(tls_a, "connection.state")]
    assert tls_states[:2] == ["handshaking", "reading"], tls_states
    plain_states = [e["to"] for e in server.connection_events(plain, "connection.state")]
    assert plain_states[:1] == ["reading"], plain_states

    chat([tls_a, plain, tls_b], "hello")

    for sender in (plain, tls_a):
        payload = os.urandom(MiB)
        readers = [BackgroundReader(c.sock, len(payload)) for c in (tls_a, plain, tls_b)
                   if c is not sender]
        sender.sock.settimeout(30)
        sender.sock.sendall(payload)
        for reader in readers:
            assert hashlib.sha256(reader.result()).digest() == hashlib.sha256(payload).digest()
    chat([tls_a, plain, tls_b], "after the big ones")

    # A TLS client that goes away (no close_notify, as most do) is a plain hang-up.
    tls_b.sock.close()
    assert server.wait_closed(tls_b)["reason"] == "peer_closed"
    chat([tls_a, plain], "two left")


def test_without_tls_port_the_port_itself_speaks_tls(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # Fails if --tls-cert alone leaves --port plain (the handshakes fail) or lets plain text in.
    server = start_server(*tls_args(files, tls_port=False))
    context = client_context(files)
    first, second = (connect_tls(server, sockets, context, server.port) for _ in range(2))
    intruder = connect_plain(server, sockets)
    intruder.sock.sendall(b"plain text on a TLS port\n")
    assert_tls_failure(server, intruder)
    assert b"plain text" not in closed_by_server(intruder.sock)
    chat([first, second], "tls only")


def test_no_plain_opens_no_plain_listener(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # Fails if --no-plain still listens on the plain --port, or stops the TLS listener too.
    # With one listener left, server.started may report it as ``port`` (with ``tls`` true)
    # or as ``tls_port``.
    plain_port = free_port()
    server = start_server(
        "--port", str(plain_port), "--host", HOST, *tls_args(files), "--no-plain", started=False
    )
    started = server.wait_event("server.started")
    port = started.get("tls_port") or started["port"]
    assert started["tls"] is True or started.get("tls_port"), started
    assert isinstance(port, int) and port != plain_port, started
    context = client_context(files)
    clients = [connect_tls(server, sockets, context, port) for _ in range(2)]
    with pytest.raises(ConnectionRefusedError):
        sockets.open(plain_port)
    chat(clients, "no plain")


# --------------------------------------------------------------------------
# Mutual TLS and failed handshakes
# --------------------------------------------------------------------------


def test_mutual_tls_admits_a_client_certificate_from_the_ca(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # Fails if --tls-client-ca refuses a certificate its CA signed, or if connection.secured
    # does not name the client certificate's subject.
    server = start_server(*tls_args(files, client_ca=True))
    port = tls_port_of(server)
    context = client_context(files, files.client_cert)
    clients = [connect_tls(server, sockets, context, port) for _ in range(2)]
    for client in clients:
        secured = server.connection_events(client, "connection.secured")[0]
        assert isinstance(secured["subject"], str), secured
        assert CLIENT_NAME in secured["subject"], secured
    chat(clients, "mutual")


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mutual_tls_refuses_a_client_without_a_good_certificate(
    start_server: StartServer, files: TlsFiles, sockets: Sockets, who: str
) -> None:
    # Fails if the client gets in (connection.secured, or what it sends after a TLS 1.3
    # handshake reaches the chat), if no tls_error warning is logged, or if the clients with
    # good certificates are disturbed.
    server = start_server(*tls_args(files, client_ca=True))
    port = tls_port_of(server)
    good = client_context(files, files.client_cert)
    members = [connect_tls(server, sockets, good, port) for _ in range(2)]

    cert = None if who == "no certificate" else files.stranger_cert
    sock, ending = refused_by_server(
        sockets, client_context(files, cert), port, b"let me in\n"
    )
    refused = accepted_client(server, sock)
    assert_tls_failure(server, refused)
    assert ending, ending
    chat(members, "members only")  # FIFO: "let me in" would have come first


def test_plain_text_on_the_tls_port_is_closed_while_tls_clients_chat(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # Fails if plain text on the TLS port is relayed, kills the server, or is not closed with
    # a tls_error warning; the TLS and plain clients must chat on.
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    tls_client = connect_tls(server, sockets, client_context(files), port)
    plain = connect_plain(server, sockets)
    intruder = connect_plain(server, sockets, port=port)
    assert server.events()[intruder.accepted_index]["tls"] is True
    intruder.sock.sendall(b"GET / HTTP/1.0\r\n\r\nhello in plain text\n")
    assert_tls_failure(server, intruder)
    assert b"hello" not in closed_by_server(intruder.sock)
    chat([tls_client, plain], "unaffected")


def test_clients_that_reset_at_once_on_the_tls_port_are_turned_away_one_by_one(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # A client that connects and resets (SO_LINGER 0, close) before the server takes it in:
    # Python 3.11.5+ reads a byte in wrap_socket, and that ECONNRESET killed the whole server.
    # Fails if the server dies, logs no rejection for them (or another reason than reset),
    # keeps a descriptor of one, or cannot serve a TLS client and a plain one afterwards.
    server = start_server("--log-level", "info", *tls_args(files))
    port = tls_port_of(server)
    fds = proc_fd_count(server.pid)
    for _ in range(300):
        reset(sockets.open(port))
    tls_client = connect_tls(server, sockets, client_context(files), port)
    plain = connect_plain(server, sockets)
    rejected = server.events("connection.rejected")
    assert rejected, "no reset client reached wrap_socket: the test proves nothing"
    assert {e["reason"] for e in rejected} == {"reset"}, rejected[:3]
    assert proc_fd_count(server.pid) == fds + 2  # the two clients, nothing of the resets
    chat([tls_client, plain], "after the resets")
    assert server.proc.poll() is None, server.describe()


def test_stalled_handshakes_cannot_take_the_places_of_real_clients(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # With --max-clients 8, eight TCP connections to the TLS port that never say hello took
    # every place until the handshake timeout: a real TLS client got server_full. Handshakes
    # under way may take a quarter of the places (README): each newcomer past that closes the
    # oldest unfinished one. Fails if the real client is turned away, if the wrong (not the
    # oldest) stalled ones are closed, or if they are closed for another reason.
    max_clients = 8
    at_once = max_clients // 4
    server = start_server("--max-clients", str(max_clients), *tls_args(files))
    port = tls_port_of(server)
    plain = connect_plain(server, sockets)
    stalled = [accepted_client(server, sockets.open(port)) for _ in range(max_clients)]
    tls_client = connect_tls(server, sockets, client_context(files), port)
    chat([tls_client, plain], "room for real clients")
    oldest = stalled[: len(stalled) + 1 - at_once]
    for client in oldest:
        error = server.wait_connection_event(client, "connection.tls_error")
        assert "oldest" in error["error"], error
        assert server.wait_closed(client)["reason"] == "handshake_limit"
        assert closed_by_server(client.sock) == b""
    for client in stalled[len(oldest):]:
        assert not server.connection_events(client, "connection.closed"), client
    assert not server.events("connection.rejected")


@pytest.mark.parametrize(
    "case", ["missing cert", "missing key", "key of another cert", "garbage cert", "missing CA"]
)
def test_unusable_tls_files_exit_with_one_line(
    files: TlsFiles, tmp_path: Path, case: str
) -> None:
    # Fails on a traceback, on several lines, on a server that starts anyway (run_cli would
    # time out: the server never exits) or on exit code 0.
    cert, key, extra = str(files.cert), str(files.key), []
    if case == "missing cert":
        cert = str(tmp_path / "absent.pem")
    elif case == "missing key":
        key = str(tmp_path / "absent.key")
    elif case == "key of another cert":
        key = str(files.other_key)
    elif case == "garbage cert":
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("this is not a certificate\n")
        cert = str(garbage)
    else:
        extra = ["--tls-client-ca", str(tmp_path / "absent-ca.pem")]
    result = run_cli(
        "--port", "0", "--host", HOST, "--tls-cert", cert, "--tls-key", key, *extra, timeout=10
    )
    assert result.returncode in (1, 2), result
    assert "server.started" not in result.stdout, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines!r}"
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------
# What TLS buffers where select cannot see it
# --------------------------------------------------------------------------


def test_tls_writes_are_delivered_without_later_traffic(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # A TLS read may leave decrypted bytes in the TLS layer, where select cannot see them:
    # the server must take them at once (SSLSocket.pending), not when the next bytes arrive.
    # Each write below is the last thing the sender sends until the receivers have it all.
    # Fails if any tail waits for later traffic (recv_exactly times out).
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    context = client_context(files)
    sender = connect_tls(server, sockets, context, port)
    receivers = [connect_plain(server, sockets), connect_tls(server, sockets, context, port)]

    relay(sender, receivers, b"x")  # one small record
    relay(sender, receivers, bytes(range(256)) * 64)  # 16 KiB: one full record
    relay(sender, receivers, os.urandom(100_000))  # one write, seven records

    # Many small records back to back: several TLS writes land before the server reads.
    records = [f"record {i:04d};".encode() for i in range(500)]
    for record in records:
        sender.sock.sendall(record)
    expected = b"".join(records)
    for receiver in receivers:
        assert recv_exactly(receiver.sock, len(expected)) == expected

    # And the other way: a plain sender to a TLS receiver.
    relay(receivers[0], [sender, receivers[1]], b"y")
    for client in (sender, *receivers):
        assert_nothing_arrives(client.sock)


class BioClient:
    """A TLS client that encrypts into memory: the test cuts the bytes into TCP writes."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write goes at once
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=SERVER_NAME)

    def handshake(self, send: Callable[[bytes], None], then: bytes = b"") -> None:
        """Handshake, handing each flight to ``send`` (which may cut it up); ``then`` is
        encrypted and sent in the same write as the client's last flight."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self._outgoing.read()
                if pending:
                    send(pending)
                data = self.sock.recv(65536)
                assert data, "the server closed during the handshake"
                self._incoming.write(data)
        pending = self._outgoing.read()  # the client's Finished
        if then:
            pending += self.encrypt(then)
        if pending:
            send(pending)

    def encrypt(self, data: bytes) -> bytes:
        """The TLS records carrying ``data``, to send however the test likes."""
        self._tls.write(data)
        return self._outgoing.read()


def test_tls_records_cut_across_tcp_writes_are_reassembled(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # The ClientHello arrives in three pieces, then a record in three pieces, the last one
    # together with a whole second record; then another client's first message comes in the
    # same write as its handshake's last flight. Between pieces another client's message goes
    # round (the server's loop turns, with the partial record readable). Fails if a partial
    # record breaks the connection or blocks the loop, if bytes are relayed before their
    # record is complete, or if the second record waits for later traffic.
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    speaker, listener = connect_plain(server, sockets), connect_plain(server, sockets)
    turns = 0

    def turn() -> None:
        nonlocal turns
        turns += 1
        relay(speaker, [listener], f"turn {turns}\n".encode())

    def send_in_three(data: bytes) -> None:
        cuts = [0, 1, len(data) // 2, len(data)]
        for start, end in itertools.pairwise(cuts):
            bio.sock.sendall(data[start:end])
            turn()

    bio = BioClient(sockets.open(port), client_context(files))
    client = accepted_client(server, bio.sock)
    bio.handshake(send_in_three)
    server.wait_connection_event(client, "connection.secured")

    first = bio.encrypt(b"split record\n")
    second = bio.encrypt(b"second record\n")
    bio.sock.sendall(first[:3])  # not even a whole record header
    turn()
    bio.sock.sendall(first[3:10])
    turn()
    bio.sock.sendall(first[10:] + second)
    expected = b"split record\nsecond record\n"
    assert recv_exactly(listener.sock, len(expected)) == expected
    assert_nothing_arrives(listener.sock)
    assert not server.connection_events(client, "connection.closed")

    # A message in the same TCP write as the client's Finished: nothing comes after it.
    eager = BioClient(sockets.open(port), client_context(files))
    accepted_client(server, eager.sock)
    eager.handshake(eager.sock.sendall, then=b"right after the handshake\n")
    expected = b"right after the handshake\n"
    assert recv_exactly(listener.sock, len(expected)) == expected


def test_a_slow_tls_reader_and_a_paused_tls_sender_lose_nothing(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    # Writes to a TLS client that cannot take them all must be retried as TLS requires
    # (SSLWantWriteError), and a TLS sender held back by flow control must be read again with
    # nothing lost. Fails on any byte lost, repeated or reordered either way.
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    context = client_context(files)
    size = 2 * MiB

    plain_sender = connect_plain(server, sockets)
    slow_tls = connect_tls(server, sockets, context, port, rcvbuf=16 * 1024)
    payload = os.urandom(size)
    slow = StreamReader(slow_tls.sock, limit=size, keep=True, pauses=[(64 * 1024, 0.3),
                                                                      (MiB, 0.3)])
    plain_sender.sock.settimeout(30)
    plain_sender.sock.sendall(payload)
    assert slow.result().data == payload

    tls_sender = slow_tls  # now the TLS client talks to a slow plain reader
    slow_plain = connect_plain(server, sockets)
    payload = os.urandom(size)
    readers = [
        StreamReader(plain_sender.sock, limit=size, keep=True),
        StreamReader(slow_plain.sock, limit=size, keep=True, pauses=[(64 * 1024, 0.3),
                                                                     (MiB, 0.3)]),
    ]
    tls_sender.sock.settimeout(30)
    tls_sender.sock.sendall(payload)
    for reader in readers:
        assert reader.result().data == payload
    assert server.proc.poll() is None


def test_a_handshake_cut_by_the_stop_is_closed_for_server_shutdown(
    start_server: StartServer, files: TlsFiles, sockets: Sockets
) -> None:
    """A TLS client still in its handshake when SIGTERM comes has nothing to be delivered: it
    is closed at once, and the reason says why (it was once an empty string)."""
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    stalled = accepted_client(server, sockets.open(port))
    server.send_signal(signal.SIGTERM)
    assert server.wait_closed(stalled)["reason"] == "server_shutdown"
    assert server.wait_exit() == 0
    assert "" not in {e["reason"] for e in server.events("connection.closed")}
