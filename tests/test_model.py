"""The whole server, driven in-process by hypothesis: random readiness, data, EOFs, errors,
resets, time passing and shutdowns, with scripted sockets in place of real ones.

The invariants: no trigger is ever invalid (no ``lifecycle.bug``), no queue passes its limit,
every connection ends ``closed`` with its socket closed, and every byte a sender's socket gave
the server reaches every recipient that was in the chat at that moment exactly once, in order
(all of it for recipients that closed cleanly, a prefix for those dropped or broken).
"""

from __future__ import annotations

import io
import math
import signal
import socket
from collections.abc import Iterable

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fsmchat.connection import Connection
from fsmchat.lifecycle import IN_CHAT, State
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.options import Options
from fsmchat.server import Server

LIMIT = 4096
CLEAN = {"peer_closed", "server_shutdown"}


class ScriptedSocket:
    """Stands in for a client socket: recv returns what the test scripted, send takes a window."""

    family = socket.AF_INET

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.inbound: list[bytes | OSError] = []  # b"" is EOF
        self.window = 0  # bytes the next send may take; 0: would block
        self.send_error: OSError | None = None
        self.received = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.inbound:
            raise BlockingIOError
        if flags & socket.MSG_PEEK:
            first = self.inbound[0]
            if isinstance(first, OSError):
                raise first
            return first[:size]
        item = self.inbound.pop(0)
        if isinstance(item, OSError):
            raise item
        assert len(item) <= size
        return item

    def _take(self, data: bytes) -> int:
        if self.send_error is not None:
            raise self.send_error
        if not self.window:
            raise BlockingIOError
        taken = data[: self.window]
        self.received += taken
        self.window -= len(taken)
        return len(taken)

    def send(self, data: bytes | memoryview) -> int:
        return self._take(bytes(data))

    def sendmsg(self, buffers: Iterable[bytes | memoryview]) -> int:
        return self._take(b"".join(bytes(b) for b in buffers))

    def close(self) -> None:
        self.closed = True


class ModelServer(Server):
    """The server, for a model whose clock does not run: the stop counts a client that has
    nothing to read as emptied at once."""

    empty_quiet = 0.0


class Chat(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.output = io.BytesIO()
        self.sink = LogStream.memory(self.output)
        self.loop = EventLoop()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.server = ModelServer(Options(host=None, port=0, max_queue_bytes=LIMIT,
                                          drain_timeout=1.0),
                                  [(self.listener, None)], make_logger(self.sink, "debug", "json"),
                                  loop=self.loop)
        self.sockets: list[ScriptedSocket] = []
        self.conns: list[Connection] = []
        self.expected: list[bytearray] = []  # per client: what it should be sent, in order
        self.stopping = False

    # -- what the outside world does --------------------------------------------------------

    @precondition(lambda self: not self.stopping and len(self.sockets) < 6)
    @rule()
    def connect(self) -> None:
        sock = ScriptedSocket(100 + len(self.sockets))
        self.server.acceptor.admit(sock, f"peer{sock.fd}")  # type: ignore[arg-type]
        self.sockets.append(sock)
        self.conns.append(self.server.hub.connections[sock.fd])
        self.expected.append(bytearray())

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5), size=st.integers(1, 3000), seed=st.integers(0, 255))
    def client_sends(self, who: int, size: int, seed: int) -> None:
        # Sizes, not st.binary: its short strings would never bring a queue near the limit.
        data = bytes((seed + i) % 256 for i in range(size))
        self.sockets[who % len(self.sockets)].inbound.append(data)

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5), error=st.sampled_from([b"", ConnectionResetError(104, "reset"),
                                                       TimeoutError(110, "timed out")]))
    def client_ends(self, who: int, error: bytes | OSError) -> None:
        self.sockets[who % len(self.sockets)].inbound.append(error)

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5))
    def client_breaks_its_receiving_side(self, who: int) -> None:
        self.sockets[who % len(self.sockets)].send_error = BrokenPipeError(32, "broken pipe")

    # -- what select reports ----------------------------------------------------------------

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5))
    def readable(self, who: int) -> None:
        """Select says the socket is readable; the loop calls its handler only if it still
        wants to read it, and a call is one recv (the head of what the client sent)."""
        sock = self.sockets[who % len(self.sockets)]
        if not sock.inbound:
            return
        sender = self.conns[self.sockets.index(sock)]
        head, pending = sock.inbound[0], len(sock.inbound)
        in_chat = [conn.state in IN_CHAT for conn in self.conns]
        self.loop.dispatch((sock.fd,), ())
        if len(sock.inbound) < pending and isinstance(head, bytes) and head:
            for i, conn in enumerate(self.conns):
                if conn is not sender and in_chat[i]:
                    self.expected[i] += head

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5), window=st.integers(0, 3000))
    def writable(self, who: int, window: int) -> None:
        sock = self.sockets[who % len(self.sockets)]
        sock.window = window  # taken only if the loop still wants to write it
        self.loop.dispatch((), (sock.fd,))

    @rule()
    def end_of_turn(self) -> None:
        self.server.end_of_turn()

    @rule()
    def time_passes(self) -> None:
        self.loop.run_timers(math.inf)

    @precondition(lambda self: not self.stopping)
    @rule(sig=st.sampled_from([signal.SIGTERM, signal.SIGINT]))
    def signal_arrives(self, sig: signal.Signals) -> None:
        self.stopping = True
        self.server.on_signals([sig])

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def queues_stay_within_the_limit(self) -> None:
        for conn in self.conns:
            assert conn.queue.nbytes <= LIMIT

    @invariant()
    def no_trigger_is_ever_invalid(self) -> None:
        self.sink.flush()
        assert b"lifecycle.bug" not in self.output.getvalue()

    @invariant()
    def bytes_arrive_in_order_and_once(self) -> None:
        for sock, expected in zip(self.sockets, self.expected, strict=True):
            assert expected.startswith(sock.received)

    def teardown(self) -> None:
        try:
            if not self.stopping:
                self.server.on_signals([signal.SIGTERM])
            for _ in range(1000):  # the stop reads what they sent, then delivers
                for who, sock in enumerate(self.sockets):
                    self.readable(who)
                    sock.window = 1 << 30
                    self.loop.dispatch((), (sock.fd,))
                self.server.end_of_turn()
                if not self.server.hub.connections:
                    break
            assert not self.server.hub.connections
            self.sink.flush()
            assert b"lifecycle.bug" not in self.output.getvalue()
            closed = {}
            for line in self.output.getvalue().splitlines():
                event = orjson.loads(line)
                if event["event"] == "connection.closed":
                    closed[event["fd"]] = event["reason"]
            for sock, conn, expected in zip(self.sockets, self.conns, self.expected, strict=True):
                assert conn.state == State.CLOSED and sock.closed
                self.check_delivered(sock, expected, closed[sock.fd])
        finally:
            self.listener.close()

    def check_delivered(self, sock: ScriptedSocket, expected: bytearray, reason: str) -> None:
        """What a closed client was sent: a prefix of what it should have been sent, all of it
        if it closed cleanly."""
        assert expected.startswith(sock.received)
        if reason in CLEAN and sock.send_error is None:
            assert sock.received == expected, reason


Chat.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_chat_model = Chat.TestCase
