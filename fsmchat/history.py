"""The chat's recent past, for late joiners: the last N messages, bounded in bytes too.

It holds the very bytes objects that were queued to everyone (no copy), and hands them to a
newcomer oldest first. What counts as a message is the caller's business: in raw mode what one
``recv`` returned, in chat mode a line everyone saw.

Rules it keeps:
- Never more than ``limit`` messages nor ``max_bytes`` bytes: the oldest go first.
- A message larger than ``max_bytes`` on its own is not kept, and evicts nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from fsmchat.hub import Extension

if TYPE_CHECKING:
    from fsmchat.connection import Connection

Replay = Callable[["Connection", Sequence[bytes]], None]


class History(Extension):
    """An extension of the hub: it keeps what was delivered and greets a newcomer with it."""

    __slots__ = ("limit", "max_bytes", "messages", "nbytes", "replay")

    def __init__(self, limit: int, max_bytes: int, replay: Replay | None = None) -> None:
        self.replay = replay  # what hands the past to a newcomer (the hub's replay)
        self.limit = limit
        self.max_bytes = max_bytes
        self.messages: deque[bytes] = deque(maxlen=limit)
        self.nbytes = 0

    def add(self, data: bytes) -> None:
        size = len(data)
        if size > self.max_bytes:
            return
        messages = self.messages
        if len(messages) == self.limit:
            self.nbytes -= len(messages[0])  # the deque drops it on append
        messages.append(data)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self.nbytes -= len(messages.popleft())

    def seed(self, data: bytes, msg_id: bytes, said_ms: int) -> None:
        """A message of the shared history's past (the chat's Redis stream)."""
        self.add(data)

    def greet(self, conn: Connection) -> None:
        if self.replay is not None and self.messages:
            self.replay(conn, tuple(self.messages))

    def delivered(self, data: bytes, lines: Sequence[bytes]) -> None:
        if lines:
            for line in lines:
                self.add(line)
        else:
            self.add(data)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.messages)
