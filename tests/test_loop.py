"""The event loop on its own: readiness reaches handlers, timers set select's timeout."""

from __future__ import annotations

import math
import socket
import time

import pytest

from fsmchat.net.loop import EventLoop


class Echo:
    def __init__(self, loop: EventLoop, sock: socket.socket) -> None:
        self.loop, self.sock = loop, sock
        self.read = b""
        self.writes = 0

    def on_readable(self) -> None:
        self.read += self.sock.recv(100)
        self.loop.stop()

    def on_writable(self) -> None:
        self.writes += 1
        self.loop.want_write(self.sock.fileno(), False)


def test_a_readable_descriptor_reaches_its_handler() -> None:
    a, b = socket.socketpair()
    loop = EventLoop()
    handler = Echo(loop, a)
    loop.register(a.fileno(), handler)
    b.sendall(b"ping")
    loop.run()
    assert handler.read == b"ping"
    a.close()
    b.close()


def test_writability_is_asked_only_while_wanted() -> None:
    a, b = socket.socketpair()
    loop = EventLoop()
    handler = Echo(loop, a)
    loop.register(a.fileno(), handler, read=False)
    loop.want_write(a.fileno(), True)
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert handler.writes == 1  # a socket with room stays writable; the loop asked once
    a.close()
    b.close()


def test_timers_set_the_select_timeout_instead_of_polling() -> None:
    loop = EventLoop()
    fired: list[str] = []
    loop.call_later(0.10, lambda: fired.append("late"))
    loop.call_later(0.05, lambda: fired.append("early"))
    cancelled = loop.call_later(0.07, lambda: fired.append("cancelled"))
    cancelled.cancel()
    loop.call_later(0.12, loop.stop)
    start = time.monotonic()
    loop.run()
    assert time.monotonic() - start >= 0.12
    assert fired == ["early", "late"]
    assert loop.turns <= 4  # one wake-up per live timer, no busy loop


@pytest.mark.parametrize("delay", [1e10, math.inf])
def test_a_timer_however_far_cannot_break_select(delay: float) -> None:
    # select raises OverflowError for a timeout past about 292 years (1e10 s, what an
    # --idle-timeout of 1e10 made): the loop must wait in bounded steps instead. The far timer
    # must not fire, and the ready descriptor must still be served.
    a, b = socket.socketpair()
    loop = EventLoop()
    fired: list[str] = []
    loop.call_later(delay, lambda: fired.append("far"))
    handler = Echo(loop, a)
    loop.register(a.fileno(), handler)
    b.sendall(b"ping")
    loop.run()
    assert handler.read == b"ping"
    assert fired == []
    a.close()
    b.close()


def test_an_unregistered_descriptor_is_not_called_in_the_same_turn() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    loop = EventLoop()
    calls: list[str] = []

    class Dropper:
        def on_readable(self) -> None:
            calls.append("dropper")
            loop.unregister(c.fileno())
            loop.unregister(a.fileno())
            loop.stop()

        def on_writable(self) -> None:
            raise AssertionError

    class Victim(Dropper):
        def on_readable(self) -> None:
            calls.append("victim")
            loop.unregister(a.fileno())
            loop.unregister(c.fileno())
            loop.stop()

    loop.register(a.fileno(), Dropper())
    loop.register(c.fileno(), Victim())
    b.sendall(b"x")
    d.sendall(b"x")
    loop.run()
    assert len(calls) == 1  # whichever ran first dropped the other
    for s in (a, b, c, d):
        s.close()
