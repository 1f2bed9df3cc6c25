"""Signals as a readable descriptor, so that SIGINT and SIGTERM wake the one select call.

A Python signal handler alone cannot wake ``select``: since PEP 475 the call is simply retried.
``signal.set_wakeup_fd`` has the C-level handler write the signal number to a socket, which the
loop watches like any other; the signal is then handled in the loop's own turn, never inside an
arbitrary line of server code.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType


def _ignore(signum: int, frame: FrameType | None) -> None:
    """Installed so the C handler runs; the work happens when the loop reads the socket."""


class SignalWatch:
    def __init__(self, signums: tuple[signal.Signals, ...]) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, _ignore) for signum in signums}

    def fileno(self) -> int:
        return self._reader.fileno()

    def take(self) -> list[signal.Signals]:
        """The signals that arrived since the last call, in order."""
        received: list[signal.Signals] = []
        while True:
            try:
                data = self._reader.recv(64)
            except BlockingIOError:
                return received
            if not data:
                return received
            received.extend(signal.Signals(number) for number in data if number in self._previous)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()
