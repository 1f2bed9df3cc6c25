"""Flow control: a reader that falls behind slows the senders down instead of the server
buffering without end, and a reader that stops reading cannot freeze the chat.

The words, each for one thing:
- A recipient is **congested** once a message takes its queue past the high-water mark (half
  the output limit), until a send takes it back under the low-water mark (a quarter): it has
  then **caught up**.
- A congested recipient **holds** senders back for ``CONGESTION_GRACE`` seconds at most; after
  that it is **stalled**: it holds nobody (it stays congested, and is closed at the output limit
  unless it reads).
- A sender held back is **paused** (the ``throttle`` trigger: the server stops reading it, so TCP
  slows it down) and **resumed** once nobody holds senders back. A sender never holds itself.
- Chat mode asks between the queue entries of one read (``holds``): a sender whose lines must
  **wait** is paused, and goes on with them (``go_on``) at the end of a loop turn where nobody
  holds it back, before anything newer is read from it.

The hub owns this object; connections tell it when they become congested or catch up, and the
hub hears through ``free`` when no recipient holds senders back any more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import IN_CHAT, State, Trigger
from fsmchat.net.loop import EventLoop, Timer

if TYPE_CHECKING:
    from fsmchat.connection import Connection

CONGESTION_GRACE = 1.0
"""Seconds a congested recipient may hold senders back before it is stalled."""


class FlowControl:
    def __init__(self, loop: EventLoop, log: FilteringBoundLogger, max_queue_bytes: int, *,
                 free: Callable[[], None]) -> None:
        self.loop = loop
        self.log = log
        self.high_water = max_queue_bytes // 2  # queued bytes past which a recipient is congested
        self.low_water = max_queue_bytes // 4  # queued bytes under which it has caught up
        self.paused: dict[int, Connection] = {}  # senders held back, by fd
        self.holding: dict[int, Timer] = {}  # congested recipients in their grace -> its timer
        self.waiting: dict[int, Connection] = {}  # chat mode: senders with lines held back
        self._free = free  # nobody holds senders back any more (after the paused resumed)

    # -- recipients ---------------------------------------------------------------------------

    def congested(self, conn: Connection) -> None:
        if conn.congested:
            return
        conn.congested = True
        self.holding[conn.fd] = self.loop.call_later(CONGESTION_GRACE,
                                                     lambda: self._stall(conn))

    def caught_up(self, conn: Connection) -> None:
        conn.congested = False
        timer = self.holding.pop(conn.fd, None)
        if timer is not None:
            timer.cancel()
            if not self.holding:
                self._resume()

    def _stall(self, conn: Connection) -> None:
        """The grace ran out: the recipient holds nobody any more (it stays congested)."""
        del self.holding[conn.fd]
        self.log.warning("connection.stalled", fd=conn.fd, peer=conn.peer,
                         queued=conn.queue.nbytes)
        if not self.holding:
            self._resume()

    def _resume(self) -> None:
        waiting = self.waiting
        for conn in list(self.paused.values()):
            if conn.fd not in waiting:  # (one with held lines resumes in go_on, after them)
                conn.fire_safely(Trigger.RESUME)
        self._free()

    # -- senders ------------------------------------------------------------------------------

    def holds(self, sender: Connection) -> bool:
        """Whether a recipient holds ``sender`` back now (a recipient never holds itself)."""
        holding = self.holding
        return bool(holding) and sender.state in IN_CHAT and (
            len(holding) > 1 or sender.fd not in holding)

    def pause_if_held(self, sender: Connection) -> None:
        """Pause ``sender`` if it is reading and a recipient holds it back (after every read:
        the common case, nobody holding, costs one test)."""
        holding = self.holding
        if holding and sender.state == State.READING and (
                len(holding) > 1 or sender.fd not in holding):
            sender.fire_safely(Trigger.THROTTLE)

    def wait(self, sender: Connection) -> None:
        """Chat mode: ``sender`` has lines held back; it is paused (if it is reading)."""
        self.waiting[sender.fd] = sender
        self.pause_if_held(sender)

    def go_on(self, lines_go_on: Callable[[Connection], None]) -> None:
        """End of a loop turn: senders whose lines waited, and whom nobody holds back any more,
        go on with them (a paused one still paused, so that nothing newer is read before
        them), then read again. Never inside a flush or a close; one held again waits for a
        later turn."""
        waiting = self.waiting
        for fd, conn in list(waiting.items()):
            if conn.state not in IN_CHAT:
                del waiting[fd]  # gone: the chat said or dropped its lines as it left
                continue
            if self.holds(conn):
                continue
            del waiting[fd]
            if not conn.safely(Trigger.RESUME, lines_go_on, conn):  # (held again: waiting)
                continue
            if conn.state == State.PAUSED and fd not in waiting and not self.holds(conn):
                conn.fire_safely(Trigger.RESUME)

    def forget(self, conn: Connection) -> None:
        """``conn`` left the chat: it is neither a paused sender nor a congested recipient."""
        self.paused.pop(conn.fd, None)
        if conn.congested:
            self.caught_up(conn)
