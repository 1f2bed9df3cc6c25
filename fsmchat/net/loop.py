"""The event loop: descriptors, interest masks and timers, nothing else.

Modelled on Redis's ``ae.c``: each turn runs ``before_sleep``, waits in the one ``select`` call of
the package for as long as the nearest timer allows, then hands every ready descriptor to its
handler (reads first, then writes) and runs the timers that are due. The loop knows nothing of
chat, connections or logging; handlers decide what readiness means.

Rules it keeps:
- A descriptor is watched for writing only while someone asked for it (``want_write``); callers
  ask only while they have output pending, so an idle socket never wakes the loop. The interest
  sets are the loop's public state (``reads``, ``writes``): a socket's per-message path adds to
  and discards from ``writes`` itself, one C call where ``want_write`` is a Python one.
- Interest is re-checked before each dispatch: a handler may drop another descriptor's interest
  (or unregister it) in the same turn, and a dropped descriptor is then not called.
- The select timeout is the time to the nearest timer, at most ``MAX_WAIT``; with no timer the
  loop sleeps until a descriptor is ready. It never polls, and no timer, however far, can make
  select's timeout overflow: a far one is waited for an hour at a time.
- Only descriptors select can watch get in: ``register`` refuses one at or above ``FD_SETSIZE``
  (``FdLimit``), so select itself never fails on a number too large (as in ``ae.c``, the limit
  lives in the loop, not in each caller).
- A handler that raises never stops the loop: an exception from ``on_readable``, ``on_writable``
  or a timer's callback goes to ``on_crash`` (the one place that contains it, as in curio), and
  the turn goes on with the next descriptor or timer. What a crash means (a log line, a socket
  closed) is the hook's business: the loop knows only who raised. ``before_sleep`` is not
  contained: it is the owner's own pass, which contains what it runs.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections.abc import Callable, Iterable
from typing import Protocol

FD_SETSIZE = 1024
"""select() watches descriptors below this number only (glibc's fixed fd_set)."""

MAX_WAIT = 3600.0
"""The longest select waits while a timer is set: select overflows past about 292 years (and
the platform's time_t may end sooner); waking once an hour for a far timer costs nothing."""


class Handler(Protocol):
    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...


CrashHook = Callable[[object, str, Exception], None]
"""``on_crash(culprit, event, exc)``: ``culprit`` is the handler whose method raised, or for a
timer the object its callback is a method of (None for a plain function); ``event`` is
``readable``, ``writable`` or the timer callback's qualified name."""


class FdLimit(Exception):
    """``register`` refused a descriptor select cannot watch (at or above ``FD_SETSIZE``)."""

    def __init__(self, fd: int) -> None:
        super().__init__(f"descriptor {fd} is at or above FD_SETSIZE ({FD_SETSIZE})")
        self.fd = fd


def _reraise(culprit: object, event: str, exc: Exception) -> None:
    """Without a hook, a handler's exception ends ``run`` like any other."""
    raise exc


class Reader:
    """A handler for descriptors that are only ever read: listeners, the signal socket."""

    __slots__ = ("on_readable",)

    def __init__(self, on_readable: Callable[[], None]) -> None:
        self.on_readable = on_readable

    def on_writable(self) -> None:
        raise AssertionError("a read-only descriptor was reported writable")


class Timer:
    """A callback due at a monotonic deadline; ``cancel`` makes it a no-op."""

    __slots__ = ("deadline", "seq", "callback", "cancelled")

    def __init__(self, deadline: float, seq: int, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class EventLoop:
    def __init__(self, on_crash: CrashHook = _reraise) -> None:
        self._handlers: dict[int, Handler] = {}  # fd -> who handles its readiness
        self.reads: set[int] = set()  # fds select watches for reading
        self.writes: set[int] = set()  # fds select watches for writing
        self._timers: list[Timer] = []  # heap by deadline; cancelled ones drop out when due
        self._seq = itertools.count()  # ties between equal deadlines go first-come first-served
        self._running = False
        self.before_sleep: Callable[[], None] = lambda: None  # end of every turn, before select
        self.on_crash = on_crash  # told of every exception a handler or a timer raises
        self.turns = 0  # loop iterations so far
        self.select_seconds = 0.0  # time spent waiting in select so far

    def register(self, fd: int, handler: Handler, *, read: bool = True) -> None:
        """Watch ``fd`` (for reading at once unless ``read`` is False); ``FdLimit`` if select
        cannot watch it: the caller turns that socket away."""
        if fd >= FD_SETSIZE:
            raise FdLimit(fd)
        self._handlers[fd] = handler
        if read:
            self.reads.add(fd)

    def unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        self.reads.discard(fd)
        self.writes.discard(fd)

    def want_read(self, fd: int, on: bool) -> None:
        if on:
            self.reads.add(fd)
        else:
            self.reads.discard(fd)

    def want_write(self, fd: int, on: bool) -> None:
        if on:
            self.writes.add(fd)
        else:
            self.writes.discard(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def cancel_timers(self) -> None:
        """Drop every timer: what was scheduled for a server that has stopped never runs."""
        self._timers.clear()

    def stop(self) -> None:
        """End ``run`` after the current turn."""
        self._running = False

    def run(self) -> None:
        self._running = True
        reads, writes = self.reads, self.writes
        while self._running:
            self.before_sleep()
            if not self._running:
                break
            timeout = self._timeout()
            entered = time.monotonic()
            readable, writable, _ = select.select(reads, writes, (), timeout)
            now = time.monotonic()
            self.select_seconds += now - entered
            self.turns += 1
            if readable or writable:
                self.dispatch(readable, writable)
                if self._timers:
                    self.run_timers(time.monotonic())
            elif self._timers:
                self.run_timers(now)

    def dispatch(self, readable: Iterable[int], writable: Iterable[int]) -> None:
        """Hand what select reported to the handlers: reads first, then writes, each only if
        its interest still holds. A handler that raises goes to ``on_crash``; the rest of the
        turn goes on (the iterator keeps its place, so nothing is called twice)."""
        reads, writes, handlers = self.reads, self.writes, self._handlers
        handler: Handler | None = None  # reset before each lookup: a crash names who raised
        ready = iter(readable)
        while True:
            try:
                for fd in ready:
                    if fd in reads:
                        handler = None
                        handler = handlers[fd]
                        handler.on_readable()
                break
            except Exception as exc:  # noqa: BLE001 - the loop's one place for a handler's crash
                self.on_crash(handler, "readable", exc)
        ready = iter(writable)
        while True:
            try:
                for fd in ready:
                    if fd in writes:
                        handler = None
                        handler = handlers[fd]
                        handler.on_writable()
                break
            except Exception as exc:  # noqa: BLE001 - the same, for writes
                self.on_crash(handler, "writable", exc)

    def _timeout(self) -> float | None:
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return min(MAX_WAIT, max(0.0, timers[0].deadline - time.monotonic()))

    def run_timers(self, now: float) -> None:
        """Run the timers due at ``now`` (a ``time.monotonic`` reading), earliest first."""
        timers = self._timers
        while timers and timers[0].deadline <= now:
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                try:
                    timer.callback()
                except Exception as exc:  # noqa: BLE001 - contained like a handler's
                    callback = timer.callback
                    self.on_crash(getattr(callback, "__self__", None),
                                  getattr(callback, "__qualname__", repr(callback)), exc)
