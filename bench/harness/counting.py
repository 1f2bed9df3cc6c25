"""Clients that count every byte they send and receive, over plain TCP or TLS.

``CountingWorker`` is the load generator's worker with every client socket replaced once it
has connected: by a ``PlainSocket`` that counts bytes, or (given a CA file) by a ``TlsSocket``
that has done its handshake (blocking, one after the other, then non-blocking: SSL's
want-read/want-write become ``BlockingIOError``, and what SSL has decrypted but not handed out
yet is read at once, since ``select`` cannot see it). From each socket's ``TCP_INFO`` come the
bytes (TLS records included) and segments it received. ``Generator`` drives such workers;
``counts`` reads their counters without resetting them, so a step can wait until every client
has received exactly what the others sent.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from harness.loadgen import LoadGen, Worker
from harness.server import raise_nofile

SERVER_NAME = "localhost"  # the name TLS clients check the certificate against
HANDSHAKE_TIMEOUT = 10.0


class PlainSocket(socket.socket):
    """A plain client socket that counts the bytes it sent and received."""

    rx = 0  # bytes received since the step began
    tx = 0  # bytes sent since the step began
    rx_all = 0  # since it connected
    tx_all = 0

    def send(self, data: Any, flags: int = 0, /) -> int:
        sent = super().send(data, flags)
        self.tx += sent
        self.tx_all += sent
        return sent

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        got = super().recv_into(buffer, nbytes, flags)
        self.rx += got
        self.rx_all += got
        return got


class TlsSocket(ssl.SSLSocket):
    """A TLS client socket as loadgen's ``Worker`` expects a non-blocking socket to behave:
    SSL's want-read/want-write (a record not complete yet, or a handshake message such as a
    session ticket instead of data) are ``BlockingIOError``; a read also takes what SSL has
    already decrypted (``pending``), which ``select`` cannot see. Counts bytes of plaintext."""

    rx = 0
    tx = 0
    rx_all = 0
    tx_all = 0

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            sent = super().send(data, flags)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError from None
        self.tx += sent
        self.tx_all += sent
        return sent

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:
            got = super().recv_into(buffer, nbytes, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        if got:
            view = memoryview(buffer)
            room = nbytes or len(view)
            while got < room and self.pending():
                try:
                    got += super().recv_into(view[got:room], None, flags)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break  # not expected with data pending; keep what was read
        self.rx += got
        self.rx_all += got
        return got


Stream = PlainSocket | TlsSocket

TCP_INFO_BYTES_RECEIVED = 128  # offsetof(struct tcp_info, tcpi_bytes_received): u64, Linux 4.1
TCP_INFO_DATA_SEGS_IN = 152  # offsetof(struct tcp_info, tcpi_data_segs_in): u32, Linux 4.6


def tcp_received(sock: socket.socket) -> tuple[int, int]:
    """Bytes (TLS records included) and segments with data the kernel has received on this
    socket so far, from TCP_INFO; (0, 0) where that is not available."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return 0, 0
    if len(info) < TCP_INFO_DATA_SEGS_IN + 4:
        return 0, 0
    (wire,) = struct.unpack_from("<Q", info, TCP_INFO_BYTES_RECEIVED)
    (segs,) = struct.unpack_from("<I", info, TCP_INFO_DATA_SEGS_IN)
    return int(wire), int(segs)


class CountingWorker(Worker):
    """loadgen's worker, with every client socket replaced after it connected: by a counting
    plain socket, or (``ca`` given) by a TLS socket that has done its handshake."""

    def __init__(self, control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
        self.streams: list[tuple[int, Stream]] = []  # before Worker.__init__: _reset_stats
        self.tcp_base: dict[int, tuple[int, int]] = {}  # gid -> tcp_received() at step start
        self.closed_rx = self.closed_tx = 0  # bytes of the clients already closed
        self.context: ssl.SSLContext | None = None
        if ca is not None:
            self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            self.context.sslsocket_class = TlsSocket
        self.tls_version = ""
        self.tls_cipher = ""
        super().__init__(control, wid, lifetime)

    def _connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = super()._connect(msg)
        errors: dict[str, int] = reply["errors"]
        failed = 0
        for client in self.clients:
            raw = client.sock
            self.sel.unregister(raw)
            self.by_fd.pop(raw.fileno(), None)
            try:
                stream = self._upgrade(raw)
            except OSError as exc:  # ssl.SSLError and TimeoutError too
                why = f"handshake: {type(exc).__name__}: {exc}"[:120]
                errors[why] = errors.get(why, 0) + 1
                raw.close()
                failed += 1
                continue
            client.sock = stream
            self.by_fd[stream.fileno()] = client
            self.sel.register(stream, selectors.EVENT_READ, client)
            self.streams.append((client.gid, stream))
        reply["connected"] -= failed
        reply["errors"] = errors
        return reply

    def _upgrade(self, raw: socket.socket) -> Stream:
        if self.context is None:
            plain = PlainSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            plain.setblocking(False)
            return plain
        raw.settimeout(HANDSHAKE_TIMEOUT)  # blocking, one handshake after the other
        tls = self.context.wrap_socket(raw, server_hostname=SERVER_NAME)
        tls.setblocking(False)
        assert isinstance(tls, TlsSocket)
        cipher = tls.cipher()
        self.tls_version, self.tls_cipher = tls.version() or "", cipher[0] if cipher else ""
        return tls

    def _close_clients(self) -> None:
        for _gid, stream in self.streams:
            self.closed_rx += stream.rx_all
            self.closed_tx += stream.tx_all
        self.streams = []
        super()._close_clients()

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self.tcp_base = {}
        for gid, stream in self.streams:
            stream.rx = stream.tx = 0
            self.tcp_base[gid] = tcp_received(stream)

    def _stats(self) -> dict[str, Any]:
        stats = super()._stats()
        rows = []
        for gid, s in self.streams:
            wire0, segs0 = self.tcp_base.get(gid, (0, 0))
            wire, segs = tcp_received(s) if s.fileno() >= 0 else (wire0, segs0)
            rows.append([gid, s.rx, s.tx, wire - wire0, segs - segs0])
        stats["streams"] = rows
        stats["rx_all"] = self.closed_rx + sum(s.rx_all for _, s in self.streams)
        stats["tx_all"] = self.closed_tx + sum(s.tx_all for _, s in self.streams)
        stats["tls"] = [self.tls_version, self.tls_cipher]
        return stats


def counting_worker_main(control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
    raise_nofile()
    CountingWorker(control, wid, lifetime, ca).serve()


class Generator(LoadGen):
    """A ``LoadGen`` with ``CountingWorker`` processes: plain (``ca`` None) or TLS.
    ``target(control, wid, lifetime, ca)`` may run a subclass of ``CountingWorker`` instead."""

    def __init__(self, ca: str | None, procs: int = 1, lifetime: float = 3600.0, *,
                 target: Callable[..., None] = counting_worker_main,
                 name: str = "tls-bench-gen") -> None:
        super().__init__(procs, lifetime, target=target, extra=(ca,), name=name)

    def counts(self) -> list[dict[str, Any]]:
        """Every worker's counters now (the ``stats`` command does not reset them)."""
        return self._ask_all([{"cmd": "stats"}] * len(self.workers))
