"""--max-recv-rate: a per-client token bucket on what the server reads from each client.

A client over its rate is not read until it has credit again (state ``limited``): nothing is
dropped, it still receives the chat, and everyone else goes on at full speed.

Lower bounds on a transfer's duration assume the bucket holds at most one second of credit and
that one read may overdraw it by at most 64 KiB (one recv). Then the last read of N bytes
starts no earlier than (N - rate - 64 KiB) / rate seconds after the first.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    HOST,
    WAIT,
    Client,
    ServerProcess,
    StartServer,
    recv_exactly,
    run_cli,
    usage_error,
)
from tls_certs import (
    Sockets,
    client_context,
    connect_plain,
    connect_tls,
    make_tls_files,
    tls_args,
    tls_port_of,
)

KiB = 1024
#: The most one read may overdraw the bucket by (see the module's docstring).
ONE_READ = 64 * KiB
#: Markers the chatting pair sends; the bulk payload never contains "<" or ">".
MARKER = re.compile(rb"<[a-z]+\d+>")


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    jar = Sockets()
    yield jar
    jar.close()


def bulk(size: int) -> bytes:
    """``size`` bytes of a counting pattern (no "<" or ">"): order and loss both show."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
    block = bytes(alphabet[(i * 7 + i // 36) % 36] for i in range(36 * 37))
    return (block * (size // len(block) + 1))[:size]


def min_seconds(size: int, rate: int) -> float:
    """The least time ``size`` bytes can take at ``rate`` (module docstring), with 10% slack."""
    return max(0.0, (size - rate - ONE_READ) / rate) * 0.9


class StreamLog:
    """Everything a socket receives, read in a thread; tests wait on what has arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()
        self.error: Exception | None = None
        self._done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.sock.settimeout(30)
            while chunk := self.sock.recv(1 << 20):
                with self._cond:
                    self.data += chunk
                    self._cond.notify_all()
        except OSError as exc:  # includes TimeoutError and the close at teardown
            self.error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait(self, ready: Callable[[bytes], bool], what: str, timeout: float = WAIT) -> float:
        """Wait until ``ready(all that arrived)``; return the monotonic time it became true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready(bytes(self.data)):
                remaining = deadline - time.monotonic()
                if self._done or remaining <= 0:
                    raise AssertionError(
                        f"no {what}: {len(self.data)} bytes arrived, error={self.error!r}"
                    )
                self._cond.wait(remaining)
            return time.monotonic()

    def wait_marker(self, marker: bytes, timeout: float = WAIT) -> float:
        return self.wait(lambda data: marker in data, repr(marker), timeout)

    def wait_bulk(self, size: int, timeout: float) -> float:
        """Wait until ``size`` bytes besides the markers have arrived."""
        return self.wait(lambda data: len(MARKER.sub(b"", data)) >= size,
                         f"{size} bulk bytes", timeout)


def sender_thread(sock: socket.socket, payload: bytes) -> threading.Thread:
    """Send ``payload`` in one sendall from a thread (it blocks while the server holds back)."""

    def run() -> None:
        sock.settimeout(30)
        sock.sendall(payload)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def limited_events(server: ServerProcess, client: Client) -> list[dict[str, object]]:
    """The client's ``connection.limited`` events, checked for their fields."""
    events = server.connection_events(client, "connection.limited")
    for event in events:
        assert event["level"] == "debug", event
        credit_in = event["credit_in"]
        assert isinstance(credit_in, int | float) and 0 < credit_in <= 2, event
    return events


def test_a_fast_sender_is_held_to_its_rate_while_others_chat_at_full_speed(
    start_server: StartServer, sockets: Sockets
) -> None:
    # ``fast`` sends 320 KiB at once against a 64 KiB/s limit. Fails if the transfer finishes
    # sooner than the rate allows, if a byte is lost or reordered, or if the chatting pair
    # waits behind the limited sender (a round trip over 0.5 s, or chat that does not finish
    # long before the transfer does). The limited sender still gets the chat.
    rate = 64 * KiB
    size = 320 * KiB
    server = start_server("--max-recv-rate", "64K")
    fast, receiver, left, right = (connect_plain(server, sockets) for _ in range(4))
    logs = {client.fd: StreamLog(client.sock) for client in (receiver, left, right)}
    payload = bulk(size)

    started = time.monotonic()
    sending = sender_thread(fast.sock, payload)
    server.wait_connection_event(fast, "connection.limited")
    markers: list[bytes] = []
    for turn in range(3):
        for speaker, listener in ((left, right), (right, left)):
            marker = f"<{'l' if speaker is left else 'r'}{turn}>".encode()
            markers.append(marker)
            sent = time.monotonic()
            speaker.sock.sendall(marker)
            latency = logs[listener.fd].wait_marker(marker) - sent
            assert latency < 0.5, f"{marker!r} took {latency:.2f}s while a sender was limited"
    chat_done = time.monotonic()

    finished = logs[receiver.fd].wait_bulk(size, timeout=30)
    elapsed = finished - started
    assert elapsed >= min_seconds(size, rate), f"{size} bytes at {rate} B/s took {elapsed:.2f}s"
    assert elapsed <= size / rate + 3, f"far slower than the rate: {elapsed:.2f}s"
    assert finished - chat_done > 1.0, "the chat should be over long before the transfer"
    sending.join(WAIT)
    assert not sending.is_alive()

    for client in (receiver, left, right):
        log = logs[client.fd]
        log.wait_bulk(size, timeout=WAIT)
        assert MARKER.sub(b"", bytes(log.data)) == payload, f"fd {client.fd}: bulk mangled"
        expected = [m for m in markers if not (client is left and m.startswith(b"<l"))
                    and not (client is right and m.startswith(b"<r"))]
        assert MARKER.findall(bytes(log.data)) == expected
    chat = b"".join(markers)
    assert recv_exactly(fast.sock, len(chat)) == chat  # limited, but still in the chat
    server.wait_received_from(fast, size)
    assert limited_events(server, fast)
    states = [e["to"] for e in server.connection_events(fast, "connection.state")]
    assert "limited" in states, states
    assert not server.connection_events(fast, "connection.closed")


def test_a_limited_sender_that_hangs_up_is_still_read_to_the_end(
    start_server: StartServer, sockets: Sockets
) -> None:
    # ``fast`` sends 192 KiB and half-closes at once. Fails if its EOF is acted on before the
    # bytes in front of it were read (they would be lost) or if the EOF is never read.
    rate = 64 * KiB
    size = 192 * KiB
    server = start_server("--max-recv-rate", str(rate))
    fast, receiver = (connect_plain(server, sockets) for _ in range(2))
    payload = bulk(size)
    started = time.monotonic()
    fast.sock.sendall(payload)
    fast.sock.shutdown(socket.SHUT_WR)
    assert recv_exactly(receiver.sock, size, timeout=20) == payload
    assert time.monotonic() - started >= min_seconds(size, rate)
    closed = server.wait_closed(fast)
    assert closed["reason"] == "peer_closed", closed
    assert closed["bytes_in"] == size, closed
    assert limited_events(server, fast)


def test_a_rate_limited_tls_sender_is_delivered_whole_without_later_traffic(
    start_server: StartServer, sockets: Sockets, tmp_path: Path
) -> None:
    # A TLS sender over its rate: when it is read again, what TLS already decrypted must not
    # wait for more traffic. 256 KiB in one TLS write, nothing after it. Fails if the tail
    # never arrives, or on any byte lost or reordered, or if it beats the rate.
    rate = 64 * KiB
    size = 256 * KiB
    files = make_tls_files(tmp_path)
    server = start_server(*tls_args(files), "--max-recv-rate", "64K")
    port = tls_port_of(server)
    context = client_context(files)
    fast = connect_tls(server, sockets, context, port)
    receivers = [connect_plain(server, sockets), connect_tls(server, sockets, context, port)]
    logs = [StreamLog(client.sock) for client in receivers]
    payload = bulk(size)
    started = time.monotonic()
    sending = sender_thread(fast.sock, payload)
    for log in logs:
        finished = log.wait_bulk(size, timeout=30)
        assert bytes(log.data) == payload
        assert finished - started >= min_seconds(size, rate)
    sending.join(WAIT)
    assert limited_events(server, fast)


@pytest.mark.parametrize("value", ["lots", "-5K", "4X", "1.5.3M"])
def test_bad_rate_exits_2_with_one_line_naming_the_option(value: str) -> None:
    # Fails if a bad rate is taken (the server would start and run_cli time out), or on a
    # traceback or several lines. --help must list the option, or exit 2 proves nothing.
    assert "--max-recv-rate" in run_cli("--help").stdout
    result = run_cli("--port", "0", "--host", HOST, "--max-recv-rate", value, timeout=10)
    usage_error(result, "--max-recv-rate")
