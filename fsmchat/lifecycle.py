"""The connection lifecycle, as data.

Everything that decides *which state a connection is in* lives in ``TRANSITIONS``, one table of
rows ``trigger: sources -> dest / action``. The server builds its ``transitions`` machine from it,
the tests walk it, and the diagram generator draws it: there is no second description to keep in
step. This module does no I/O and imports nothing of the server.

Rules the table keeps:
- A row whose ``dest`` is ``None`` is an internal transition: the action runs, the state stays.
- ``action`` names a method of the model (the connection); it runs after the state has changed.
- A trigger that has no row for the current state is a bug in the caller, never a user's doing.
- ``closed`` is terminal, and every other state has a way to reach it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class State(StrEnum):
    ACCEPTED = "accepted"  # socket taken from the listener, not yet in the loop's read set
    READING = "reading"  # in the chat: reads messages, receives everyone else's
    PAUSED = "paused"  # in the chat, but not read from until congested recipients catch up
    DRAINING = "draining"  # reads nothing, takes no new messages, delivers what is queued
    CLOSING = "closing"  # out of the loop; its socket is closed at the end of this loop step
    CLOSED = "closed"  # socket closed, model released


class Trigger(StrEnum):
    START = "start"  # the socket is non-blocking and registered with the loop
    READABLE = "readable"  # select reported the socket readable
    WRITABLE = "writable"  # select reported the socket writable (asked only while output is queued)
    HANGUP = "hangup"  # the peer closed its sending side (recv returned EOF)
    THROTTLE = "throttle"  # its message left a recipient's queue over the high-water mark
    RESUME = "resume"  # no recipient holds senders back any more
    SHUTDOWN = "shutdown"  # the server is stopping
    DRAINED = "drained"  # the outgoing queue became empty while draining
    FAIL = "fail"  # a socket error, or a close forced by the server
    RELEASE = "release"  # the loop step that decided to close has ended


INITIAL = State.ACCEPTED
IN_CHAT = (State.READING, State.PAUSED)  # take new messages
LIVE = (State.ACCEPTED, *IN_CHAT, State.DRAINING)


@dataclass(frozen=True, slots=True)
class Transition:
    trigger: str
    sources: tuple[str, ...]
    dest: str | None  # None: internal transition, the state does not change
    action: str | None  # method of the model run once the state has changed
    doc: str


TRANSITIONS: tuple[Transition, ...] = (
    Transition(Trigger.START, (State.ACCEPTED,), State.READING, "join",
               "join the chat: read from the client, queue others' messages to it"),
    Transition(Trigger.READABLE, (State.READING,), None, "receive",
               "recv once; broadcast what came, or hang up on EOF"),
    Transition(Trigger.WRITABLE, (*IN_CHAT, State.DRAINING), None, "flush",
               "send as much of the queue as the socket takes"),
    Transition(Trigger.THROTTLE, (State.READING,), State.PAUSED, "pause_reading",
               "flow control: stop reading from it, so TCP slows the sender down"),
    Transition(Trigger.RESUME, (State.PAUSED,), State.READING, "resume_reading",
               "every congested recipient caught up (or stalled): read again"),
    Transition(Trigger.HANGUP, (State.READING,), State.DRAINING, "leave",
               "the peer sent EOF: stop reading, deliver what is queued"),
    Transition(Trigger.SHUTDOWN, IN_CHAT, State.DRAINING, "leave",
               "the server is stopping: stop reading, deliver what is queued"),
    Transition(Trigger.DRAINED, (State.DRAINING,), State.CLOSING, "detach",
               "everything queued was delivered"),
    Transition(Trigger.FAIL, LIVE, State.CLOSING, "detach",
               "socket error or forced close: drop the queue"),
    Transition(Trigger.RELEASE, (State.CLOSING,), State.CLOSED, "finish",
               "end of the loop step: close the socket, forget the connection"),
)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A named table with its states: what a machine and a diagram are built from."""

    name: str
    states: tuple[str, ...]
    initial: str
    final: str
    transitions: tuple[Transition, ...]

    def machine_config(self) -> dict[str, Any]:
        """Keyword arguments for a ``transitions`` machine that runs this table."""
        return {
            "states": [str(state) for state in self.states],
            "initial": str(self.initial),
            "transitions": [
                {"trigger": str(row.trigger), "source": [str(s) for s in row.sources],
                 "dest": str(row.dest) if row.dest else None, "after": row.action}
                for row in self.transitions
            ],
            "auto_transitions": False,
        }


CONNECTION = Lifecycle("connection", tuple(State), INITIAL, State.CLOSED, TRANSITIONS)
LIFECYCLES = (CONNECTION,)
"""Every machine the server runs; the diagram generator draws each one."""


class InvalidTrigger(Exception):
    """A trigger fired in a state that has no row for it: a bug, reported, never fatal."""

    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"trigger {trigger!r} is not allowed in state {state!r}")
        self.state = state
        self.trigger = trigger


def _rows_by_source() -> dict[tuple[str, str], Transition]:
    rows: dict[tuple[str, str], Transition] = {}
    for row in TRANSITIONS:
        for source in row.sources:
            if (source, row.trigger) in rows:
                raise ValueError(f"two rows for {row.trigger!r} in state {source!r}")
            rows[source, row.trigger] = row
    return rows


ROWS: dict[tuple[str, str], Transition] = _rows_by_source()
"""(state, trigger) -> row: the table indexed the way a dispatcher reads it."""


def row_for(state: str, trigger: str) -> Transition:
    try:
        return ROWS[state, trigger]
    except KeyError:
        raise InvalidTrigger(state, trigger) from None


def next_state(state: str, trigger: str) -> str:
    row = row_for(state, trigger)
    return state if row.dest is None else row.dest


def allowed(state: str, trigger: str) -> bool:
    return (state, trigger) in ROWS
