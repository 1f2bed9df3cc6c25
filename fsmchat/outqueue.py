"""A connection's outgoing queue: shared buffers in, as few send calls as possible out.

A broadcast appends the *same* bytes object to every recipient's queue, so a message costs one
reference per recipient, never a copy. A send that takes only part of the queue leaves the unsent
tail of the first unfinished buffer at the head, as a memoryview (still no copy). The queue does
no I/O: ``chunk`` says what to hand to ``send``/``sendmsg`` and ``consume`` records what was taken,
so it is tested without sockets.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice

Buffer = bytes | memoryview

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
"""sendmsg refuses more buffers than this in one call."""


class OutQueue:
    __slots__ = ("_buffers", "nbytes")

    def __init__(self) -> None:
        self._buffers: deque[Buffer] = deque()
        self.nbytes = 0  # bytes queued, counting only the unsent part of the head

    def __len__(self) -> int:
        return len(self._buffers)

    def __bool__(self) -> bool:
        return bool(self._buffers)

    def append(self, data: bytes) -> None:
        self._buffers.append(data)
        self.nbytes += len(data)

    def chunk(self) -> list[Buffer]:
        """The buffers for one ``sendmsg`` call, oldest first."""
        buffers = self._buffers
        if len(buffers) <= IOV_MAX:
            return list(buffers)
        return list(islice(buffers, IOV_MAX))

    def head(self) -> Buffer:
        return self._buffers[0]

    def consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front: whole buffers, then a cut into the next one."""
        self.nbytes -= sent
        buffers = self._buffers
        while sent:
            first = buffers[0]
            size = len(first)
            if sent < size:
                buffers[0] = memoryview(first)[sent:]
                return
            buffers.popleft()
            sent -= size

    def clear(self) -> None:
        self._buffers.clear()
        self.nbytes = 0
