"""TLS material and client sockets for the black-box tests of TLS, access lists and timeouts.

trustme makes throwaway CAs: one signs the server's certificate (for ``localhost`` and
127.0.0.1) and a client certificate; another, unrelated CA signs a "stranger" client
certificate that mutual TLS must refuse. Clients are plain ``socket`` / ``ssl`` objects in
blocking mode with timeouts, tracked by a :class:`Sockets` jar so that teardown closes them.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import trustme
from conftest import HOST, WAIT, Client, Event, ServerProcess, peer_of

SocketT = TypeVar("SocketT", bound=socket.socket)

#: The common name of the client certificate signed by the server's CA.
CLIENT_NAME = "fsmchat-test-client"
#: The common name of the client certificate signed by the other CA.
STRANGER_NAME = "fsmchat-stranger"
#: The name the TLS clients check the server's certificate against.
SERVER_NAME = "localhost"


@dataclass(frozen=True)
class TlsFiles:
    """A CA, the server's certificate and key as files, and client certificates."""

    ca: trustme.CA
    ca_pem: Path
    cert: Path
    key: Path
    client_cert: trustme.LeafCert
    stranger_cert: trustme.LeafCert
    #: A private key that does not belong to ``cert`` (for the mismatch case).
    other_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a fresh CA, server certificate and key (and a foreign key) under ``directory``."""
    ca = trustme.CA()
    server_cert = ca.issue_cert(SERVER_NAME, HOST)
    client_cert = ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
    stranger_cert = trustme.CA().issue_cert(STRANGER_NAME, common_name=STRANGER_NAME)
    files = TlsFiles(
        ca=ca,
        ca_pem=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        client_cert=client_cert,
        stranger_cert=stranger_cert,
        other_key=directory / "other.key",
    )
    ca.cert_pem.write_to_path(str(files.ca_pem))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    server_cert.private_key_pem.write_to_path(str(files.key))
    client_cert.private_key_pem.write_to_path(str(files.other_key))
    return files


def tls_args(files: TlsFiles, *, tls_port: bool = True, client_ca: bool = False) -> list[str]:
    """Server options for TLS: a second listener (``--tls-port 0``) unless ``tls_port`` is off."""
    args = ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    if tls_port:
        args += ["--tls-port", "0"]
    if client_ca:
        args += ["--tls-client-ca", str(files.ca_pem)]
    return args


def client_context(files: TlsFiles, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """A client context that trusts the test CA and presents ``cert`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    files.ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


def tls_port_of(server: ServerProcess) -> int:
    """The TLS listener's port, from ``server.started``."""
    started = server.wait_event("server.started")
    assert isinstance(started.get("tls_port"), int), started
    port: int = started["tls_port"]
    return port


def timestamp(event: Event) -> float:
    """An event's ``timestamp`` (ISO 8601, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


class Sockets:
    """Opens client sockets and closes every one of them at the end (see the fixtures)."""

    def __init__(self) -> None:
        self._opened: list[socket.socket] = []

    def keep(self, sock: SocketT) -> SocketT:
        """Track a socket made elsewhere (an SSLSocket that replaced a raw one, say)."""
        self._opened.append(sock)
        return sock

    def open(
        self,
        port: int,
        source: str | None = None,
        host: str = HOST,
        rcvbuf: int | None = None,
    ) -> socket.socket:
        """A TCP connection to ``host:port``, bound first to ``source`` (any port) if given."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.keep(socket.socket(family, socket.SOCK_STREAM))
        sock.settimeout(WAIT)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
        return sock

    def close(self) -> None:
        for sock in self._opened:
            sock.close()


def accepted_client(server: ServerProcess, sock: socket.socket) -> Client:
    """Wait for the server's ``connection.accepted`` of ``sock`` (matched by peer)."""
    peer = peer_of(sock)
    index = server.wait_for_index(
        lambda e: e.get("event") == "connection.accepted" and e.get("peer") == peer,
        what=f"connection.accepted for {peer}",
    )
    fd = int(server.events()[index]["fd"])
    return Client(sock=sock, fd=fd, peer=peer, accepted_index=index)


def connect_plain(
    server: ServerProcess, sockets: Sockets, port: int | None = None, source: str | None = None
) -> Client:
    """A plain client on ``port`` (default: the plain listener), once the server accepted it."""
    sock = sockets.open(server.port if port is None else port, source)
    return accepted_client(server, sock)


def connect_tls(
    server: ServerProcess,
    sockets: Sockets,
    context: ssl.SSLContext,
    port: int,
    *,
    secured: bool = True,
    rcvbuf: int | None = None,
) -> Client:
    """A TLS client on ``port``: TCP connect, accepted, handshake; with ``secured`` (the
    default) also wait for the server's ``connection.secured``, so that it is in the chat."""
    raw = sockets.open(port, rcvbuf=rcvbuf)
    client = accepted_client(server, raw)
    tls = sockets.keep(context.wrap_socket(raw, server_hostname=SERVER_NAME))
    tls.settimeout(WAIT)
    client = replace(client, sock=tls)
    if secured:
        server.wait_connection_event(client, "connection.secured")
    return client


def refused_by_server(
    sockets: Sockets, context: ssl.SSLContext, port: int, attempt: bytes = b""
) -> tuple[socket.socket, str]:
    """Connect and handshake where the server must refuse the handshake.

    With TLS 1.3 the client's handshake may finish before the server has checked the client's
    certificate; then the refusal shows on the first read. ``attempt`` is sent if the client
    got that far. Returns the socket and how it ended (an error's text, or "EOF"); fails if
    application data arrives.
    """
    raw = sockets.open(port)
    tls = sockets.keep(
        context.wrap_socket(raw, server_hostname=SERVER_NAME, do_handshake_on_connect=False)
    )
    tls.settimeout(WAIT)
    try:
        tls.do_handshake()
        if attempt:
            tls.sendall(attempt)
        data = tls.recv(65536)
    except (ssl.SSLError, ConnectionError) as exc:
        return tls, f"{type(exc).__name__}: {exc}"
    assert data == b"", f"a refused TLS client got data: {data[:80]!r}"
    return tls, "EOF"
