"""A connection's outgoing queue: shared buffers in, as few send calls as possible out.

A broadcast appends the *same* bytes object to every recipient's queue, so a message costs one
reference per recipient, never a copy. A send that takes only part of the queue leaves the unsent
tail of the first unfinished buffer at the head, as a memoryview (still no copy). ``chunk`` says
what to hand to ``sendmsg`` (``joined``: to ``send``, where there is no ``sendmsg``) and ``consume``
records what was taken, so the bookkeeping is tested without sockets; ``sock.LoopSocket``'s
``send_queued`` is the one socket call that puts them together.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice

Buffer = bytes | memoryview

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
"""sendmsg refuses more buffers than this in one call."""

JOIN_MAX = 64 * 1024
"""Bytes joined for one send where there is no sendmsg (TLS): four TLS records, and little to
join again when the socket takes only part of it."""


class OutQueue(deque[Buffer]):
    """A deque of buffers that also counts its bytes; ``len`` and truth stay C-level calls."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0  # bytes queued, counting only the unsent part of the head

    def push(self, data: bytes) -> None:
        self.append(data)
        self.nbytes += len(data)

    def chunk(self) -> list[Buffer]:
        """The buffers for one ``sendmsg`` call, oldest first."""
        if len(self) <= IOV_MAX:
            return list(self)
        return list(islice(self, IOV_MAX))

    def joined(self) -> bytes:
        """The head buffers as one, up to ``JOIN_MAX`` bytes (or the first buffer, if larger)."""
        parts: list[Buffer] = []
        size = 0
        for buffer in self:
            if parts and size + len(buffer) > JOIN_MAX:
                break
            parts.append(buffer)
            size += len(buffer)
        return b"".join(parts)

    def consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front: whole buffers, then a cut into the next one."""
        if sent == self.nbytes:  # all of it, the usual case
            self.clear()
            return
        self.nbytes -= sent
        while sent:
            first = self[0]
            size = len(first)
            if sent < size:
                self[0] = memoryview(first)[sent:]
                return
            self.popleft()
            sent -= size

    def clear(self) -> None:
        super().clear()
        self.nbytes = 0
