"""The hub: who is in the chat, how a message reaches them, and the counters.

Every connection the acceptor took in is in ``connections`` until it is closed; those in the
chat (``reading``, ``paused``, ``limited``, ``emptied``) are ``readers`` too, and only readers
take messages. What the rest of the server does with a chat plugs in as an ``Extension``
(chat mode, history, the Redis bus): the hub calls each one's hooks, in the order they were
plugged, and never asks which ones there are.

The verbs, one per way of sending:
- ``deliver``: to every local reader (but the sender), or to those of one audience (``to``:
  chat mode's room, a mapping of readers the chat keeps as they come and go);
- ``publish``: to the other instances only (the bus's ``published`` hook);
- ``broadcast``: both, what a local client says;
- ``tell``: to one local client;
- ``relay``: what another instance published, reaching this one;
- ``seed``: what the shared history (Redis streams, the history file) held before this
  process heard of it: for the history of newcomers only, never delivered.

Every message a local client says (``broadcast``, ``publish``) is numbered: ``seq`` counts
them, and ``msg_id`` makes the number an id no other instance or restart gives,
``<origin>-<seq>`` (``origin``: 16 hex digits, new at every start). With ``--redis`` the number
travels in the bus's envelope, so that every instance knows a message by the same id.

Rules it keeps:
- A message is appended, as the same bytes object, to the queue of every reader (of ``to``)
  but its sender; counters are bumped once per message, never per recipient.
- Output limit: a recipient whose queue would pass ``max_queue_bytes`` is closed
  (``queue_limit``) once the delivery is done; everyone else still gets the message. The
  closes, and the leave notices they announce (which may take others past their limit in turn),
  run from one work list at one level, never by recursion: one warning per client.
- A connection that moved to ``closing`` during a loop turn is released after it (``release``),
  so no descriptor is closed while the loop may still hold its number.
- In chat mode a client the server sends away hears why (``close_with``: one ``*** `` line,
  then the close); in raw mode it is closed without a word, as the relay always did.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from structlog.typing import FilteringBoundLogger

from fsmchat import lifecycle
from fsmchat.flow import FlowControl
from fsmchat.lifecycle import IN_CHAT, Trigger
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import HotEvents, hot_events
from fsmchat.reasons import Reason

if TYPE_CHECKING:
    from fsmchat.connection import Connection


Relayed = Callable[[bytes, bytes, "int | None"], bool]
"""Takes what another instance said: (payload, its id, late: None or when it was said)."""

HOOKS = ("greet", "joined", "left", "delivered", "published", "free", "end_of_turn", "stopping",
         "drain", "forced", "isolated", "reconnected", "gap")
"""The hooks the hub calls through ``call`` or its own lists (``unread`` and ``done`` are asked
of every part)."""


class Extension:
    """A part of the server that plugs into the hub: chat mode, history, the Redis bus.

    Each hook is a no-op here; a part overrides what it needs, and the hub calls only those."""

    __slots__ = ()

    def greet(self, conn: Connection) -> None:
        """A newcomer entered the chat: what it gets before anything live (a welcome, the
        history)."""

    def joined(self, conn: Connection) -> None:
        """The newcomer is live: it takes every message from now on."""

    def left(self, conn: Connection) -> None:
        """A client left the chat, for whatever reason (``conn.reason`` says which)."""

    def delivered(self, data: bytes, lines: Sequence[bytes]) -> None:
        """A message reached every local reader (``lines``: the lines it joins, if several)."""

    def published(self, data: bytes, head: bytes, seq: int) -> None:
        """A local message (number ``seq``: ``Hub.seq``), for the other instances; ``head``
        goes before it in the payload (chat mode says where it goes: ``#ROOM\\n`` or
        ``@NAME\\n``)."""

    def free(self) -> None:
        """Relayed messages may come again: no recipient holds senders back (paused clients
        resumed already) and no relayed lines wait."""

    def end_of_turn(self) -> None:
        """The end of a loop turn, before what closed during it is released."""

    def unread(self, conn: Connection) -> int:
        """Bytes of ``conn``'s that this part holds and has not passed on (a stop cut short
        counts them)."""
        return 0

    def stopping(self) -> None:
        """Every client has been read to its end: the chat drains now (clients still here)."""

    def drain(self) -> None:
        """Every client was told to drain: finish what waits, then close."""

    def forced(self, reason: str) -> None:
        """The stop was cut short (``reason``): close now."""

    def done(self) -> bool:
        """Whether nothing of this part is left to finish before the process may end."""
        return True

    def isolated(self) -> None:
        """With --redis: the other instances cannot be reached (once per outage, however many
        retries follow); local chat goes on."""

    def reconnected(self) -> None:
        """With --redis: every link to the other instances is back after ``isolated``."""

    def gap(self, where: bytes) -> None:
        """With --redis: messages of ``where`` (a room's key; raw mode: b"") were said while
        this instance could not hear them, and the shared history no longer holds them."""


class Gate:
    """What a newcomer passes before it is in the chat (the join password). A client it holds
    is in ``connections`` and may be told things, but takes no message and is greeted by no
    part; the gate calls ``Hub.admit`` once it may come in."""

    __slots__ = ()

    def holds(self, conn: Connection) -> bool:
        """A newcomer, before anything greets it: whether the gate holds it back for now."""
        return False

    def gone(self, conn: Connection) -> None:
        """A client the gate held left (for whatever reason) before it was admitted."""


@dataclass(slots=True)
class Counts:
    """What the hub and the acceptor counted since the start (only ever grows)."""

    accepted: int = 0
    messages_in: int = 0  # read from local clients: recvs (raw) or lines (chat)
    messages_out: int = 0  # queued to local clients, one per recipient
    bytes_in: int = 0  # of connections already closed; live ones add theirs in a snapshot
    bytes_out: int = 0
    closed: Counter[str] = field(default_factory=Counter)  # reason -> connections closed
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> turned away


@dataclass(frozen=True, slots=True)
class Limits:
    """What the hub's connections are held to."""

    max_queue_bytes: int  # queued bytes past which a recipient is closed
    max_recv_rate: int = 0  # bytes per second a client may send (0: no limit)
    idle_timeout: float = 0.0  # seconds a client may stay silent (0: forever)
    handshake_timeout: float = 10.0  # seconds a TLS handshake may take


class Hub:
    def __init__(self, loop: EventLoop, log: FilteringBoundLogger, limits: Limits, *,
                 gone: Callable[[Connection], None], chat_mode: bool = False) -> None:
        self.loop = loop
        self.log = log
        self.events = hot_events(log)  # the events it emits most, rendered cheaply
        self.trace: HotEvents | None = self.events if self.events.debug else None
        """The events per read, per write and per state change: None above debug."""
        self.limits = limits
        self.chat_mode = chat_mode  # clients read lines: one closed or turned away is told why
        self.max_queue_bytes = limits.max_queue_bytes
        self.counts = Counts()
        self.connections: dict[int, Connection] = {}  # every connection not yet closed, by fd
        self.readers: dict[int, Connection] = {}  # in the chat: take messages
        self.flow = FlowControl(loop, log, limits.max_queue_bytes, free=self._free)
        self.extensions: tuple[Extension, ...] = ()
        self.received: Callable[[Connection, bytes], None] = self._relay_bytes
        """What a connection's recv is handed to: straight to everyone (raw mode), or chat
        mode's framing."""
        self.relayed: Relayed = self._relay_payload
        """What another instance's payload (its id, when it was said if it comes late) is
        handed to; says whether some of it waits."""
        self.seeded: Callable[[bytes, bytes, int], None] = _ignore
        """What the shared history's past messages are handed to: (payload, id, when it was
        said in Unix ms)."""
        self.origin = os.urandom(8).hex().encode()  # this process's part of every message id
        self.seq = 0  # messages said here so far: the last one's number
        self.delivering = b""  # chat mode: the id of the room message being delivered, for
        # the pages that show ids (b"": none, or not a room message)
        self.relay_waits: Callable[[], bool] = _never
        """Whether some of what other instances relayed waits for flow control."""
        self._gone = gone  # a connection was forgotten (its seat is free)
        self.gate: Gate | None = None
        """What newcomers must pass first (chat mode's --password): those it holds are no
        readers, and no part greets them, until it admits them."""
        self._overflowed: dict[int, Connection] = {}  # past the limit, to close: by fd, in order
        self._refused = 0  # messages left out of a queue for its limit, so far
        self._closing_overflowed = False  # _close_overflowed is working through its list
        self._closing: list[Connection] = []  # moved to `closing` this turn; released after it
        self._hooks: dict[str, list[Callable[..., object]]] = {name: [] for name in HOOKS}
        self._greet: list[Callable[..., object]] = []  # the hooks the hot paths call, as lists
        self._joined: list[Callable[..., object]] = []
        self._left: list[Callable[..., object]] = []
        self._delivered: list[Callable[..., object]] = []
        self._published: list[Callable[..., object]] = []

    def plug(self, *extensions: Extension) -> None:
        """Plug the server's parts in, in the order their hooks run (the server's constructor
        calls this once). Only the hooks a part overrides are called."""
        self.extensions = extensions
        for name in HOOKS:
            base = getattr(Extension, name)
            self._hooks[name] = [getattr(part, name) for part in extensions
                                 if getattr(type(part), name) is not base]
        self._greet = self._hooks["greet"]
        self._joined = self._hooks["joined"]
        self._left = self._hooks["left"]
        self._delivered = self._hooks["delivered"]
        self._published = self._hooks["published"]

    def take_input(self, received: Callable[[Connection, bytes], None],
                   relayed: Relayed, relay_waits: Callable[[], bool]) -> None:
        """Chat mode takes what clients send and what other instances relay (the server's
        constructor calls this once)."""
        self.received = received
        self.relayed = relayed
        self.relay_waits = relay_waits

    def call(self, hook: str, *args: object) -> None:
        """Run one hook of every part that has it, in order."""
        for run in self._hooks[hook]:  # (a name that is no hook: KeyError, never silence)
            run(*args)

    def unread_by_parts(self, conn: Connection) -> int:
        """Bytes of ``conn``'s that the parts hold and have not passed on."""
        return sum(part.unread(conn) for part in self.extensions)

    def parts_done(self) -> bool:
        return all(part.done() for part in self.extensions)

    # -- sending ------------------------------------------------------------------------------

    def _relay_bytes(self, sender: Connection, data: bytes) -> None:
        """Raw mode: what one recv returned is one message, for everyone else."""
        self.counts.messages_in += 1
        self.broadcast(data, sender)
        self.flow.pause_if_held(sender)

    def _relay_payload(self, payload: bytes, msg_id: bytes, late: int | None) -> bool:
        self.deliver(payload)
        return False

    def msg_id(self, seq: int) -> bytes:
        """The id of the message numbered ``seq`` here."""
        return b"%s-%d" % (self.origin, seq)

    def broadcast(self, data: bytes, sender: Connection | None = None,
                  lines: Sequence[bytes] = (), to: Mapping[int, Connection] | None = None,
                  head: bytes = b"") -> None:
        """A message for every local reader (of ``to``) but ``sender``, and for every other
        instance (``head`` before it in the payload).

        ``lines``: the chat lines that ``data`` joins, when it joins several (one sender's lines
        of one read go out as one queue entry; history and the counters still see each)."""
        self.seq += 1
        self.deliver(data, sender, lines, to)
        for publish in self._published:
            publish(data, head, self.seq)

    def publish(self, data: bytes, head: bytes = b"") -> None:
        """A message for the other instances only."""
        self.seq += 1
        for publish in self._published:
            publish(data, head, self.seq)

    def deliver(self, data: bytes, sender: Connection | None = None,
                lines: Sequence[bytes] = (), to: Mapping[int, Connection] | None = None) -> None:
        """The same bytes object to every local queue (of ``to``: readers by fd) but
        ``sender``'s."""
        readers = self.readers if to is None else to
        refused = self._refused
        for conn in readers.values():
            if conn is not sender:
                conn.enqueue(data)
        count = len(readers) - (self._refused - refused)
        if sender is not None and readers.get(sender.fd) is sender:
            count -= 1
        self.counts.messages_out += count * (len(lines) or 1)
        for delivered in self._delivered:
            delivered(data, lines)
        if self._overflowed:
            self._close_overflowed()

    def tell(self, conn: Connection, data: bytes) -> None:
        """A message for one client only, while it is in the chat."""
        if conn.state not in IN_CHAT:
            return
        refused = self._refused
        conn.enqueue(data)
        if self._refused == refused:
            self.counts.messages_out += 1
        if self._overflowed:
            self._close_overflowed()

    def replay(self, conn: Connection, messages: Sequence[bytes]) -> None:
        """Messages of the past for a newcomer, oldest first."""
        for data in messages:
            conn.enqueue(data)
        self.counts.messages_out += len(messages)
        if self._overflowed:
            self._close_overflowed()

    def relay(self, payload: bytes, msg_id: bytes = b"", late: int | None = None) -> bool:
        """A message from another instance (``msg_id``: its id, b"" for one without; ``late``:
        None, or when it was said in Unix ms, 0 if it does not say), for every local reader.
        Whether a recipient now holds senders back, or some of it waits for flow control: the
        subscriber then pauses, and resumes once it is out (``free``)."""
        waits = self.relayed(payload, msg_id, late)
        return bool(self.flow.holding) or waits

    def seed(self, payload: bytes, msg_id: bytes, said_ms: int) -> None:
        """A message of the shared history's past, for newcomers' history only."""
        self.seeded(payload, msg_id, said_ms)

    # -- what connections tell the hub -----------------------------------------------------------

    def joined(self, conn: Connection) -> None:
        """A client entered the chat: what the parts greet it with, then live; unless the gate
        holds it (chat mode's --password), which admits it later."""
        if self.gate is not None and self.gate.holds(conn):
            return
        self.admit(conn)

    def admit(self, conn: Connection) -> None:
        """A client is in the chat: a reader from now on, greeted by the parts, then live."""
        self.readers[conn.fd] = conn
        for greet in self._greet:
            greet(conn)
        if conn.state in IN_CHAT:
            for joined in self._joined:
                joined(conn)

    def departed(self, conn: Connection) -> None:
        """A client left the chat (for whatever reason): no more messages for it."""
        if self.readers.pop(conn.fd, None) is not None:
            for left in self._left:
                left(conn)
        elif self.gate is not None:
            self.gate.gone(conn)
        self.flow.paused.pop(conn.fd, None)

    def quit(self, conn: Connection) -> None:
        if conn.state in IN_CHAT:  # not if its goodbye took it past its limit
            conn.reason = Reason.QUIT
            conn.fire_safely(Trigger.QUIT)

    def in_chat(self, conn: Connection) -> bool:
        return conn.state in IN_CHAT

    def close_with(self, conn: Connection, reason: str, line: bytes) -> None:
        """Send ``conn`` away for ``reason`` (a ``Reason``: a moderator's /kick, say), telling it
        why: in chat mode ``line`` (one ``*** `` line ending in ``\\n``) goes after what is
        queued, and the socket closes once it is out (``connection.FAREWELL_TIMEOUT`` seconds at
        most); others see it leave as for any close. Raw mode: closed at once, without a line.
        A bug closes that client only."""
        conn.safely(Trigger.DISMISS, conn.close_with, reason, line)

    def overflowed(self, conn: Connection) -> None:
        self._refused += 1
        self._overflowed[conn.fd] = conn  # once, however many messages it refuses meanwhile

    def release_soon(self, conn: Connection) -> None:
        self._closing.append(conn)

    def forget(self, conn: Connection) -> None:
        del self.connections[conn.fd]
        counts = self.counts
        counts.closed[str(conn.reason)] += 1  # the plain string: a JSON key and a label
        counts.bytes_in += conn.bytes_in
        counts.bytes_out += conn.bytes_out
        self._gone(conn)

    def release(self) -> None:
        """End of a loop turn: close what moved to ``closing`` during it."""
        while self._closing:
            closing, self._closing = self._closing, []
            for conn in closing:
                conn.fire_safely(Trigger.RELEASE)

    # -- flow control's news -----------------------------------------------------------------

    def _free(self) -> None:
        """Flow control holds nobody back any more: relayed messages may come again, unless
        some of them still wait (they go on at the end of a turn: ``relay_done``)."""
        if not self.relay_waits():
            self.call("free")

    def relay_done(self) -> None:
        """What other instances relayed and flow control held back is all out."""
        if not self.flow.holding:
            self.call("free")

    def _close_overflowed(self) -> None:
        """Close every recipient past its limit, oldest first, from one work list.

        A close announces a leave (chat mode), which may take others past their limit: they join
        the list (a nested call returns at once), so the stack stays flat however many there are."""
        if self._closing_overflowed:
            return
        self._closing_overflowed = True
        overflowed = self._overflowed
        try:
            while overflowed:
                conn = overflowed.pop(next(iter(overflowed)))
                if not lifecycle.allowed(conn.state, Trigger.FAIL):
                    continue  # closed meanwhile, for another reason
                self.log.warning("connection.queue_limit", fd=conn.fd, peer=conn.peer,
                                 queued=conn.queue.nbytes, limit=self.max_queue_bytes)
                conn.safely(Trigger.DISMISS, conn.close_over_limit)
        finally:
            self._closing_overflowed = False


def _never() -> bool:
    return False


def _ignore(payload: bytes, msg_id: bytes, said_ms: int) -> None:
    """No history to seed."""
