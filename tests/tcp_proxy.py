"""A TCP proxy in the test process, between an fsmchat instance and Redis, that a test can cut.

``TcpProxy(host, port)`` listens on 127.0.0.1 on a port of its own and forwards every connection
it accepts to ``host:port``, byte for byte, both ways. Pointed at it (``--redis proxy.url``), an
instance's links to Redis go through it, and the test decides when they break:

- ``cut()``: every proxied connection is closed abruptly, both sides, with an RST (SO_LINGER 0),
  as a Redis or a network that dropped them; until ``restore()``, each new connection is accepted
  and reset at once (the listener stays, so the port cannot be taken by anyone else meanwhile).
- ``blackhole()``: a silent network. Nothing is forwarded any more, no connection is closed, and
  new ones are accepted and held without being connected onwards. What either side sends waits
  in the kernel's buffers (the proxy stops reading it), so ``restore()`` after a blackhole is a
  cable plugged back in: what waited is delivered, late.
- ``restore()``: forwarding again; held connections are connected onwards now.

Every call returns once the proxy's thread has done it: after ``cut()`` the RSTs are sent.

The proxy is one thread with a ``selectors`` loop (the tests may use threads; the server may
not); each direction has a bounded buffer, and a side is read only while the other side's buffer
has room, so a slow reader slows the writer as a real network would. An end of file or an error
on either side closes the pair (what is buffered for the other side is sent first, if it can be
without waiting). ``tcp_proxy`` is the pytest factory fixture; every proxy is closed at teardown.

PYTEST_DONT_REWRITE (imported first, as redis_harness): its asserts carry their own messages.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from enum import Enum

import pytest
from conftest import HOST, WAIT

BUFFER_MAX = 1024 * 1024
"""Bytes buffered per direction before the proxy stops reading the sending side."""

RECV_SIZE = 256 * 1024


class Mode(Enum):
    OPEN = "open"  # forwarding
    CUT = "cut"  # every connection reset; new ones reset at once
    BLACKHOLE = "blackhole"  # nothing forwarded, nothing closed; new ones held


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Side:
    """One end of a proxied connection: its socket and what waits to be sent to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.connected = True  # False while a non-blocking connect is under way

    def fileno(self) -> int:
        return self.sock.fileno()


class _Pair:
    """A proxied connection: the client that came to the proxy and the upstream it dialled."""

    def __init__(self, client: socket.socket) -> None:
        self.client = _Side(client)
        self.upstream: _Side | None = None  # None while held (blackhole) or before dialling
        self.closed = False

    def other(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client


class TcpProxy:
    """A cuttable TCP proxy on 127.0.0.1:<ephemeral> to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.listener = socket.create_server((host, 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.mode = Mode.OPEN
        #: Connections accepted in all, and those reset because the proxy was cut.
        self.accepted = 0
        self.refused = 0
        #: Bytes forwarded each way: to the target, and back to the clients.
        self.bytes_up = 0
        self.bytes_down = 0
        self.pairs: list[_Pair] = []
        self.cond = threading.Condition()  # guards the counters and ``pairs``; notified on change
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._calls: list[tuple[Callable[[], None], threading.Event]] = []
        self._calls_lock = threading.Lock()
        self._stopping = False
        self._error: BaseException | None = None
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    # ---- the test's side -------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Proxied connections open now (held ones included)."""
        with self.cond:
            return len(self.pairs)

    def cut(self) -> None:
        """Reset every connection, both sides; reset each new one at once until ``restore``."""
        self._call(self._cut)

    def blackhole(self) -> None:
        """Forward nothing, close nothing; hold new connections until ``restore``."""
        self._call(self._blackhole)

    def restore(self) -> None:
        """Forward again; connect held connections onwards."""
        self._call(self._restore)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait until ``predicate()`` holds (checked with ``cond`` held, at every change)."""
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"proxy {self.port}: no {what} within {timeout}s "
                                     f"(mode {self.mode.value}, {len(self.pairs)} connections, "
                                     f"{self.accepted} accepted)")

    def close(self) -> None:
        """Stop the thread; every socket is closed (connections reset)."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._wake()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), f"proxy {self.port}: its thread did not end"
        if self._error is not None:
            raise AssertionError(f"proxy {self.port} failed: {self._error!r}") from self._error

    def _call(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the proxy's thread and wait until it has run."""
        assert self._thread.is_alive(), f"proxy {self.port} is not running ({self._error!r})"
        done = threading.Event()
        with self._calls_lock:
            self._calls.append((action, done))
        self._wake()
        assert done.wait(WAIT), f"proxy {self.port}: its thread did not answer"

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # ---- the proxy's thread ------------------------------------------------------

    def _changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._selector.select(timeout=1.0):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._run_calls()
                    else:
                        pair, side = key.data
                        self._ready(pair, side, mask)
        except BaseException as exc:  # reported by close(): a broken proxy fails its test
            self._error = exc
            raise
        finally:
            self._run_calls()  # nobody waits in vain
            for pair in list(self.pairs):
                self._close(pair, rst=True)
            self._selector.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()
            self._changed()

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for action, done in calls:
            try:
                action()
            finally:
                done.set()
        self._changed()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    return
                raise
            with self.cond:
                self.accepted += 1
            if self.mode is Mode.CUT:
                _reset(sock)
                with self.cond:
                    self.refused += 1
                self._changed()
                continue
            sock.setblocking(False)
            pair = _Pair(sock)
            with self.cond:
                self.pairs.append(pair)
            if self.mode is Mode.OPEN:
                self._dial(pair)
            self._update(pair)
            self._changed()

    def _dial(self, pair: _Pair) -> None:
        """Connect the pair's upstream, without blocking (finished when it is writable)."""
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        code = upstream.connect_ex(self.target)
        side = _Side(upstream)
        side.connected = code == 0
        if code not in (0, errno.EINPROGRESS):
            upstream.close()
            self._close(pair, rst=True)  # the target is not there: the client learns at once
            return
        pair.upstream = side
        self._selector.register(upstream, selectors.EVENT_WRITE, (pair, side))

    def _ready(self, pair: _Pair, side: _Side, mask: int) -> None:
        if pair.closed:
            return
        if not side.connected:
            if side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close(pair, rst=True)
                return
            side.connected = True
        if (mask & selectors.EVENT_WRITE and side.out and not self._write(pair, side)) or (
                mask & selectors.EVENT_READ and not self._read(pair, side)):
            return
        self._update(pair)
        self._changed()

    def _write(self, pair: _Pair, side: _Side) -> bool:
        """Send what waits for ``side``; False when that ended the pair."""
        try:
            sent = side.sock.send(side.out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._close(pair, rst=True)
            return False
        del side.out[:sent]
        with self.cond:
            if side is pair.client:
                self.bytes_down += sent
            else:
                self.bytes_up += sent
        return True

    def _read(self, pair: _Pair, side: _Side) -> bool:
        """Move what ``side`` sent to the other side's buffer; False when that ended the pair."""
        other = pair.other(side)
        assert other is not None, "a side was read with nowhere to forward to"
        try:
            data = side.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._close(pair, rst=True)
            return False
        if not data:  # end of file: the pair ends
            self._close(pair, rst=False)
            return False
        other.out += data
        return True

    def _update(self, pair: _Pair) -> None:
        """Register each side for what it may do now (by the mode and the buffers)."""
        for side in (pair.client, pair.upstream):
            if side is None or pair.closed:
                continue
            other = pair.other(side)
            events = 0
            if not side.connected:
                events = selectors.EVENT_WRITE
            elif self.mode is Mode.OPEN and other is not None and other.connected:
                if len(other.out) < BUFFER_MAX:
                    events |= selectors.EVENT_READ
                if side.out:
                    events |= selectors.EVENT_WRITE
            key = self._selector.get_map().get(side.sock)
            if key is None and events:
                self._selector.register(side.sock, events, (pair, side))
            elif key is not None and not events:
                self._selector.unregister(side.sock)
            elif key is not None and key.events != events:
                self._selector.modify(side.sock, events, (pair, side))

    def _close(self, pair: _Pair, *, rst: bool) -> None:
        """Close both sides: with an RST, or a FIN after a last try at what is buffered."""
        if pair.closed:
            return
        pair.closed = True
        for side in (pair.client, pair.upstream):
            if side is None:
                continue
            if side.sock in self._selector.get_map():
                self._selector.unregister(side.sock)
            if rst:
                _reset(side.sock)
                continue
            if side.out and side.connected:
                with contextlib.suppress(OSError):
                    side.sock.send(side.out)
            side.sock.close()
        with self.cond:
            self.pairs.remove(pair)
            self.cond.notify_all()

    def _cut(self) -> None:
        self.mode = Mode.CUT
        for pair in list(self.pairs):
            self._close(pair, rst=True)

    def _blackhole(self) -> None:
        self.mode = Mode.BLACKHOLE
        for pair in self.pairs:
            self._update(pair)

    def _restore(self) -> None:
        self.mode = Mode.OPEN
        for pair in list(self.pairs):
            if pair.upstream is None:
                self._dial(pair)
            if not pair.closed:
                self._update(pair)


ProxyFactory = Callable[[str, int], TcpProxy]


@pytest.fixture
def tcp_proxy() -> Iterator[ProxyFactory]:
    """Factory: ``tcp_proxy(host, port)``, a running ``TcpProxy``; closed at teardown."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        return proxy

    yield make
    errors: list[AssertionError] = []
    for proxy in proxies:
        try:
            proxy.close()
        except AssertionError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]

