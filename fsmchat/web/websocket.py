"""A WebSocket client of the chat: a ``Connection`` whose bytes travel in frames.

The web site hands over a socket whose handshake request h11 parsed and ``wsproto`` accepted;
from then on it is a row of the connection table like any client (``upgrade``: accepted ->
reading), with the same limits, flow control, history and shutdown. What differs is only the
framing, so only the two ends change:

- in: what one recv brings is fed to wsproto; the messages it completes are handed to the hub
  as what that one recv returned (joined: raw mode relays bytes, chat mode frames lines, and a
  message always ends a line), pings are answered, a close frame is a hangup;
- out: every message is one frame. Server frames are not masked, so the frame is the same for
  every recipient: ``Frames`` makes it once per message (one copy of the message, whatever the
  number of browsers), and every WebSocket queue holds that one bytes object. A client that
  asked for ids (chat mode's ``fsmchat.ids``: ``chat/resume.py``) gets a room message's frame
  after its id (``\\x1e<id>\\n``; ``Hub.delivering`` as it is queued): a second frame per
  message, shared by every such client too; replies and notices to one client carry none.

Rules it keeps:
- A message over ``limit`` (chat mode: --max-line; raw mode: one recv's worth) is refused with
  1009, a text frame that is not UTF-8 with 1007, a malformed frame with 1002, a binary frame in
  chat mode (whose lines are text) with 1003: the close frame goes after what is queued.
- Pongs are queued like messages: one that would take the queue past --max-queue-bytes
  closes the client (``queue_limit``), so pings from one that never reads cost no memory.
- The server pings every ``PING_INTERVAL`` seconds; a client that has not answered the previous
  ping by then is gone (``no_pong``), unless the server holds it back (flow control, its rate:
  its pong is not read yet). Pings and pongs are not chat: --idle-timeout still counts a
  silent client as silent; but --max-recv-rate counts every byte it sends, pings too.
- Every way out of the chat that delivers what is queued (shutdown 1001, /quit 1000, the peer's
  own close frame answered) ends with a close frame, then the socket closes. A close frame or
  a refusal that came in a read which left the client held back (flow control, its rate) takes
  effect when the server reads it again, as a TCP client's EOF would.
- In chat mode a close the server decides says why first, as to nc users: its ``*** `` line
  in a text frame, then the close frame with the same words as its reason and a code a page
  can act on: 1008 (policy: --idle-timeout, a moderator's /kick: reconnecting will not help),
  1013 (try again later: past --max-queue-bytes), or the refused frame's own (1009, 1003, 1007;
  a malformed frame, 1002, gets no line).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from fsmchat.connection import Connection
from fsmchat.lifecycle import IN_CHAT, State, Trigger
from fsmchat.net.loop import Timer
from fsmchat.reasons import Reason

if TYPE_CHECKING:
    from fsmchat.chat.resume import Resume
    from fsmchat.hub import Hub

PING_INTERVAL = 30.0
"""Seconds between the server's pings: often enough for proxies and NATs that drop quiet
connections after a minute, and to find a vanished browser within two intervals."""

TEXT, BINARY = 0x1, 0x2

ID_MARK = b"\x1e"
"""What starts the id in front of a frame for a client that reads ids (``fsmchat.ids``):
ASCII's record separator, which no chat line holds (``clean`` shows control characters in
caret notation), then the id and a newline."""

MIN_READ = 16
"""Bytes a read takes at least, a frame's longest header and more, however much of a message
waits unfinished."""

_CLOSE_CODES: dict[str, int] = {Reason.SERVER_SHUTDOWN: CloseReason.GOING_AWAY,
                Reason.MESSAGE_TOO_BIG: CloseReason.MESSAGE_TOO_BIG,
                Reason.QUEUE_LIMIT: CloseReason.TRY_AGAIN_LATER,
                Reason.IDLE_TIMEOUT: CloseReason.POLICY_VIOLATION}
"""The close code of a close for a reason; one the server decides and says why otherwise gets
1008 (a /kick), one that says nothing 1000 (/quit)."""


class Frames:
    """Each message's frame, made once, for every WebSocket recipient; and once more, after
    the message's id, for every recipient that reads ids."""

    __slots__ = ("opcode", "last", "framed", "last_with_id", "msg_id", "framed_with_id")

    def __init__(self, opcode: int) -> None:
        self.opcode = opcode  # TEXT in chat mode (its lines are clean UTF-8), else BINARY
        self.last: bytes | None = None  # the message the frame is of (held: its id stays)
        self.framed = b""
        self.last_with_id: bytes | None = None  # the same, for the frame after an id
        self.msg_id = b""
        self.framed_with_id = b""

    def frame(self, data: bytes) -> bytes:
        """``data`` as one frame: one copy per message, shared by every recipient (one queue
        entry each, as for a TCP client: a header of its own would double the entries that
        every send gathers)."""
        if data is not self.last:
            self.last = data
            self.framed = frame_header(self.opcode, len(data)) + data
        return self.framed

    def frame_with_id(self, data: bytes, msg_id: bytes) -> bytes:
        """``data`` as one frame after ``ID_MARK``, its message's id and a newline: one copy
        per message too, shared by every recipient that reads ids (b"" alone: the id of a
        sender's own line, for it)."""
        if data is not self.last_with_id or msg_id != self.msg_id:
            self.last_with_id = data
            self.msg_id = msg_id
            head = ID_MARK + msg_id + b"\n"
            self.framed_with_id = frame_header(self.opcode, len(head) + len(data)) + head + data
        return self.framed_with_id


def frame_header(opcode: int, size: int) -> bytes:
    """RFC 6455's header of one final, unmasked frame (what a server sends)."""
    first = 0x80 | opcode
    if size < 126:
        return bytes((first, size))
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


class WebConnection(Connection):
    __slots__ = ("ws", "frames", "limit", "lines", "partial", "partial_size", "closing_code",
                 "refusal", "goodbye", "ping_timer", "pinged", "ids")

    def __init__(self, sock: socket.socket, peer: str, hub: Hub, *, ws: WSConnection,
                 accept: bytes, trailing: bytes, frames: Frames, limit: int,
                 bytes_in: int = 0, resume: Resume | None = None) -> None:
        """``accept``: the 101 answer, queued first; ``trailing``: what came after the request;
        ``bytes_in``: what HTTP read of it (the request and ``trailing``); ``resume``: what the
        handshake asked for (chat mode: ids, a room and what it showed last)."""
        super().__init__(sock, peer, hub)
        self.bytes_in = bytes_in
        self.asked = resume
        self.ids = resume is not None and resume.ids  # room messages' frames after their id
        self.ws = ws
        self.frames = frames
        self.limit = limit  # the longest message it may send
        self.lines = frames.opcode == TEXT  # chat mode: a message is a line
        self.partial: list[bytes] = []  # the pieces of an unfinished message
        self.partial_size = 0
        self.closing_code: int | None = None  # the code of the close frame it gets at the end
        self.refusal: tuple[int, str] | None = None  # why it is refused (code, reason), once read
        self.goodbye: CloseConnection | None = None  # its close frame, once read
        self.ping_timer: Timer | None = None
        self.pinged = False  # a ping went out and no pong came back yet
        self.push(accept)
        if trailing:
            ws.receive_data(trailing)

    def __repr__(self) -> str:
        return f"<WebConnection fd={self.fd} {self.peer} {self.state}>"

    # -- out --------------------------------------------------------------------------------

    def enqueue(self, data: bytes) -> None:
        msg_id = self.hub.delivering if self.ids else b""
        framed = self.frames.frame_with_id(data, msg_id) if msg_id else self.frames.frame(data)
        size = self.queue.nbytes + len(data)  # (its header aside: the largest message fits the
        # smallest --max-queue-bytes, as for a TCP client)
        if size > self.flow.high_water and not self.may_grow(size):
            return
        self.push(framed)

    # -- actions ----------------------------------------------------------------------------

    def join(self) -> None:
        self.ping_timer = self.loop.call_later(PING_INTERVAL, self._ping)  # (before: a close
        # during the greeting cancels it)
        super().join()
        if self.state == State.READING:
            self._take_events()  # what came right after the handshake request

    def receive(self) -> None:
        # At most a TCP client's read, with what an unfinished message holds already: the
        # messages one read completes reach the hub as one read, of at most that much.
        data = self.recv_some(max(MIN_READ, self.recv_size - self.partial_size))
        if data is None:
            return
        if not data:
            self.reason = Reason.PEER_CLOSED
            self.fire(Trigger.HANGUP)
            return
        self.bytes_in += len(data)
        trace = self.hub.trace
        if trace is not None:
            trace.received(self.fd, len(data))
        if self.limits.max_recv_rate:  # every byte it sends: pings and fragments too
            self._charge(len(data), time.monotonic())
        self.ws.receive_data(data)
        self._take_events()

    def _take_events(self) -> None:
        """What wsproto parsed: the messages it completed go to the hub as one read; then a
        close frame, or a protocol error, ends it (``_end_if_due``)."""
        ws = self.ws
        done: list[bytes] = []
        overflowing = False
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self.refusal = self._piece(event, done)
                if self.refusal is not None:
                    break
            elif isinstance(event, Ping):
                pong = ws.send(event.response())
                if self.queue.nbytes + len(pong) > self.hub.max_queue_bytes:
                    overflowing = True  # pings from one that does not read its pongs
                    break
                self.push(pong)
            elif isinstance(event, Pong):
                self.pinged = False
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.OPEN:  # wsproto's own: the peer broke the rules
                    self.refusal = event.code, Reason.WEBSOCKET_ERROR
                else:
                    self.goodbye = event
                break
        if done:
            self._hand_in(done)
        if overflowing and self.state in IN_CHAT:
            self.log.warning("connection.queue_limit", fd=self.fd, peer=self.peer,
                             queued=self.queue.nbytes, limit=self.hub.max_queue_bytes)
            self.close_over_limit()
            return
        self._end_if_due()

    def _end_if_due(self) -> None:
        """The refusal or the close frame a read brought, once the server reads it: while flow
        control or its rate hold it back, it waits (``resume_reading``), after what it sent
        before it."""
        if self.state != State.READING:
            return
        if self.refusal is not None:
            self.closing_code, self.reason = self.refusal
            self.log.warning("connection.websocket_error", fd=self.fd, peer=self.peer,
                             code=int(self.refusal[0]), limit=self.limit)
            if self.lines:
                self.farewell = self._refusal_line(self.closing_code)
            self.fire(Trigger.REFUSE)
        elif self.goodbye is not None:
            self.reason = Reason.PEER_CLOSED
            self.fire(Trigger.HANGUP)

    def _refusal_line(self, code: int) -> bytes:
        """What a frame refused with ``code`` is told; a malformed frame (1002) gets no line:
        its sender does not speak WebSocket."""
        if code == CloseReason.MESSAGE_TOO_BIG:
            return (b"*** closed: your message was over %d bytes, the most this chat takes\n"
                    % self.limit)
        if code == CloseReason.UNSUPPORTED_DATA:
            return b"*** closed: this chat takes text frames only\n"
        if code == CloseReason.INVALID_FRAME_PAYLOAD_DATA:
            return b"*** closed: your message was not UTF-8\n"
        return b""

    def resume_reading(self) -> None:
        super().resume_reading()
        self._end_if_due()

    def _piece(self, event: TextMessage | BytesMessage,
               done: list[bytes]) -> tuple[int, str] | None:
        """Part of a message (or all of it): kept, ``done`` once whole; or why it is refused."""
        if self.lines and isinstance(event, BytesMessage):
            return CloseReason.UNSUPPORTED_DATA, Reason.WEBSOCKET_ERROR
        piece = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
        self.partial_size += len(piece)
        if self.partial_size > self.limit:
            return CloseReason.MESSAGE_TOO_BIG, Reason.MESSAGE_TOO_BIG
        self.partial.append(piece)
        if event.message_finished:
            done.append(b"".join(self.partial))
            self.partial.clear()
            self.partial_size = 0
        return None

    def _hand_in(self, messages: list[bytes]) -> None:
        """Whole messages, as the hub takes one read: a message ends a line in chat mode."""
        if self.lines:
            data = b"".join(message if message[-1:] == b"\n" else message + b"\n"
                            for message in messages)
        else:
            data = messages[0] if len(messages) == 1 else b"".join(messages)
        if not data:
            return
        if self.limits.idle_timeout:  # (the rate was charged as it was read)
            self.heard = time.monotonic()
        self.hub.received(self, data)

    def _ping(self) -> None:
        self.ping_timer = None
        if self.state not in IN_CHAT:
            return
        if not self.pinged:
            self.pinged = True
            self.push(self.ws.send(Ping(b"%d" % time.monotonic_ns())))
        elif self.state == State.READING and not self.has_input():
            self.log.warning("connection.idle", fd=self.fd, peer=self.peer,
                             seconds=PING_INTERVAL)
            self.close_because(Reason.NO_PONG)
            return
        # (else the server holds it back, or has not read it yet: its pong may be waiting)
        self.ping_timer = self.loop.call_later(PING_INTERVAL, self._ping)

    def last_words(self) -> None:
        """After what is queued: the line saying why (chat mode), then the close frame, the
        server's (with those words as its reason) or its answer to the peer's."""
        ws = self.ws
        line = self.farewell
        if ws.state is ConnectionState.OPEN:
            if line:
                self.push(frame_header(TEXT, len(line)))
                self.queue.push(line)
            code = self.closing_code or _CLOSE_CODES.get(
                self.reason, CloseReason.POLICY_VIOLATION if line else CloseReason.NORMAL_CLOSURE)
            words = line[4:].decode().strip() if line else None  # (without "*** ")
            self.push(ws.send(CloseConnection(code=code, reason=words)))
        elif ws.state is ConnectionState.REMOTE_CLOSING and self.goodbye is not None:
            self.push(ws.send(self.goodbye.response()))

    def _cancel_timers(self) -> None:
        super()._cancel_timers()
        if self.ping_timer is not None:
            self.ping_timer.cancel()
            self.ping_timer = None
