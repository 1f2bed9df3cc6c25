"""Every lifecycle the server runs, as data: client connections, Redis links, metrics requests.

Everything that decides *which state a connection (or link) is in* lives in one table of rows
``trigger: sources -> dest / action`` per kind of socket. The server builds a ``transitions``
machine from each, the tests walk them, and the diagram generator draws them: there is no second
description to keep in step. This module does no I/O and imports nothing of the server.

Rules the table keeps:
- A row whose ``dest`` is ``None`` is an internal transition: the action runs, the state stays.
- ``action`` names a method of the model (the connection); it runs after the state has changed.
- A trigger that has no row for the current state is a bug in the caller, never a user's doing.
- ``closed`` is terminal, and every other state has a way to reach it.
- Every state and trigger says what it means (``NAME = "value", "meaning"``), as every row does
  (``doc``): the generated docs (``fsmchat docs``) print these, and nothing else describes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self


class Documented(StrEnum):
    """A StrEnum whose members carry their meaning, one line for the docs: ``member.doc``."""

    doc: str

    def __new__(cls, value: str, doc: str = "") -> Self:
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member


class State(Documented):
    ACCEPTED = "accepted", "socket taken from the listener, not yet in the loop's read set"
    HANDSHAKING = "handshaking", "TLS: the handshake runs (--handshake-timeout); not in chat yet"
    READING = "reading", "in the chat: reads messages, receives everyone else's"
    PAUSED = "paused", "in the chat, but not read from until congested recipients catch up"
    LIMITED = "limited", "in the chat, but not read from until --max-recv-rate allows again"
    EMPTIED = "emptied", "the server stops: all it had sent is read; reads nothing, still receives"
    DRAINING = "draining", "reads nothing, takes no new messages, delivers what is queued, closes"
    CLOSING = "closing", "out of the loop; its socket is closed at the end of this loop turn"
    CLOSED = "closed", "socket closed, model released"


class Trigger(Documented):
    START = "start", "the socket is non-blocking and registered with the loop (plain TCP)"
    SECURE = "secure", "the same, for a socket accepted on a TLS listener"
    UPGRADE = ("upgrade", "the web port took a WebSocket handshake over from HTTP (its 101 "
               "answer is queued)")
    ESTABLISHED = "established", "the TLS handshake completed"
    READABLE = "readable", "select reported the socket readable"
    WRITABLE = "writable", "select reported the socket writable (asked only while output is queued)"
    HANGUP = ("hangup", "the peer closed its sending side (recv returned EOF), or sent its "
              "WebSocket close frame")
    REFUSE = ("refuse", "WebSocket: a message over the limit (1009), a text frame that is not "
              "UTF-8 (1007), a malformed frame (1002) or, in chat mode, a binary one (1003)")
    QUIT = "quit", "chat mode: the client asked to leave (/quit)"
    DISMISS = ("dismiss", "chat mode: the server sends it away and says why (--idle-timeout, "
               "past --max-queue-bytes, a moderator's /kick)")
    THROTTLE = "throttle", "its message left a recipient's queue over the high-water mark"
    RESUME = "resume", "no recipient holds senders back any more"
    OVERRUN = "overrun", "what it sent took it past its receive rate (--max-recv-rate)"
    CREDIT = "credit", "its rate allows reading again"
    EMPTY = "empty", "the server is stopping, and the client has nothing more to read (or no time)"
    SHUTDOWN = "shutdown", "the server is stopping and every client is emptied: deliver, leave"
    DRAINED = "drained", "the outgoing queue became empty while draining"
    FAIL = "fail", "a socket error, or a close forced by the server"
    RELEASE = "release", "the loop turn that decided to close has ended"


INITIAL = State.ACCEPTED
SENDING = (State.READING, State.PAUSED, State.LIMITED)  # what they send is (or will be) read
IN_CHAT = (*SENDING, State.EMPTIED)  # take new messages
LIVE = (State.ACCEPTED, State.HANDSHAKING, *IN_CHAT, State.DRAINING)


class InvalidTrigger(Exception):
    """A trigger fired in a state that has no row for it: a bug, reported, never fatal."""

    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"trigger {trigger!r} is not allowed in state {state!r}")
        self.state = state
        self.trigger = trigger


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
    Transition(Trigger.SECURE, (State.ACCEPTED,), State.HANDSHAKING, "begin_handshake",
               "TLS: start the handshake and its timeout"),
    Transition(Trigger.UPGRADE, (State.ACCEPTED,), State.READING, "join",
               "WebSocket: join the chat; the 101 answer goes first, then what everyone gets"),
    Transition(Trigger.READABLE, (State.HANDSHAKING,), None, "shake",
               "one more handshake step; it says whether to wait to read or to write"),
    Transition(Trigger.WRITABLE, (State.HANDSHAKING,), None, "shake",
               "the same, when the handshake waited to write"),
    Transition(Trigger.ESTABLISHED, (State.HANDSHAKING,), State.READING, "join",
               "the handshake completed: join the chat"),
    Transition(Trigger.READABLE, (State.READING,), None, "receive",
               "recv once (and what TLS already decrypted); broadcast it (chat mode: every line "
               "it completes), or hang up on EOF"),
    Transition(Trigger.WRITABLE, (*IN_CHAT, State.DRAINING), None, "flush",
               "send as much of the queue as the socket takes, in one send or sendmsg"),
    Transition(Trigger.THROTTLE, (State.READING,), State.PAUSED, "pause_reading",
               "flow control: stop reading from it, so TCP slows the sender down"),
    Transition(Trigger.RESUME, (State.PAUSED,), State.READING, "resume_reading",
               "every congested recipient caught up (or stalled): read again"),
    Transition(Trigger.OVERRUN, (State.READING,), State.LIMITED, "wait_for_credit",
               "rate limit: stop reading from it until its token bucket refills"),
    Transition(Trigger.CREDIT, (State.LIMITED,), State.READING, "resume_reading",
               "the bucket refilled: read again"),
    Transition(Trigger.HANGUP, (State.READING,), State.DRAINING, "leave",
               "the peer sent EOF (or a WebSocket close frame, answered after what is queued): "
               "stop reading, deliver what is queued"),
    Transition(Trigger.REFUSE, (State.READING,), State.DRAINING, "leave",
               "WebSocket: stop reading; its close frame (with the code) goes after what is "
               "queued"),
    Transition(Trigger.QUIT, SENDING, State.DRAINING, "leave",
               "chat mode: the client typed /quit; deliver what is queued (its goodbye too)"),
    Transition(Trigger.DISMISS, IN_CHAT, State.DRAINING, "send_off",
               "stop reading; a line saying why goes after what is queued (past its limit: "
               "instead of it), then close, 5 s at most (connection.FAREWELL_TIMEOUT)"),
    Transition(Trigger.EMPTY, SENDING, State.EMPTIED, "stop_reading",
               "the server is stopping and the client sent nothing for 0.2 s (or half the drain "
               "timeout passed): read no more, keep receiving what the others had sent"),
    Transition(Trigger.SHUTDOWN, (State.EMPTIED,), State.DRAINING, "leave",
               "every client is emptied (a handshaking one failed at once): deliver what is "
               "queued, then close"),
    Transition(Trigger.DRAINED, (State.DRAINING,), State.CLOSING, "detach",
               "everything queued was delivered"),
    Transition(Trigger.FAIL, LIVE, State.CLOSING, "detach",
               "socket error, TLS error, timeout, output limit or forced close: drop the queue"),
    Transition(Trigger.RELEASE, (State.CLOSING,), State.CLOSED, "finish",
               "end of the loop turn: close the socket, forget the connection"),
)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A named table with its states: what a machine and a diagram are built from."""

    name: str
    states: tuple[str, ...]
    initial: str
    final: str
    transitions: tuple[Transition, ...]
    rows: dict[tuple[str, str], Transition] = field(init=False, repr=False, compare=False)
    """(state, trigger) -> row: the table indexed the way a dispatcher reads it."""

    def __post_init__(self) -> None:
        rows: dict[tuple[str, str], Transition] = {}
        for row in self.transitions:
            for source in row.sources:
                if (source, row.trigger) in rows:
                    raise ValueError(f"{self.name}: two rows for {row.trigger!r} in {source!r}")
                rows[source, row.trigger] = row
        object.__setattr__(self, "rows", rows)

    def row_for(self, state: str, trigger: str) -> Transition:
        try:
            return self.rows[state, trigger]
        except KeyError:
            raise InvalidTrigger(state, trigger) from None

    def next_state(self, state: str, trigger: str) -> str:
        row = self.row_for(state, trigger)
        return state if row.dest is None else row.dest

    def allowed(self, state: str, trigger: str) -> bool:
        return (state, trigger) in self.rows

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

# The connection's table, indexed: what the connection's code and tests read.
row_for = CONNECTION.row_for
next_state = CONNECTION.next_state
allowed = CONNECTION.allowed


class LinkState(Documented):
    IDLE = "idle", "created, not yet dialled"
    CONNECTING = ("connecting", "a non-blocking connect, to each address of the host in turn: "
                  "waits to be writable, 5 s at most per address")
    GREETING = ("greeting", "connected; AUTH/SELECT and PING, SUBSCRIBE or SCRIPT LOAD sent, "
                "replies awaited (5 s at most)")
    READY = ("ready", "publishes what local clients send, receives what the channel carries, or "
             "keeps presence (names, rooms) in Redis")
    PAUSED = "paused", "subscriber not read from until congested local recipients catch up"
    BACKOFF = ("backoff", "lost or refused: waits for the retry timer (0.1 s doubling to 2 s, "
               "with jitter); local chat goes on")
    DRAINING = "draining", "the server is stopping: publishes what waits, awaits the replies"
    CLOSED = "closed", "socket closed for good"


class LinkTrigger(Documented):
    DIAL = "dial", "the server started, or the retry timer fired"
    WRITABLE = "writable", "select reported the socket writable (connect done, or output queued)"
    CONNECTED = "connected", "the non-blocking connect succeeded"
    READABLE = "readable", "select reported the socket readable"
    GREETED = "greeted", "every greeting command was answered without an error"
    THROTTLE = "throttle", "what it delivered left a local recipient over the high-water mark"
    RESUME = "resume", "no local recipient holds senders back any more"
    FAIL = ("fail", "refused at every address, socket error, EOF, a protocol error, an error "
            "reply, or no answer within 5 s")
    SHUTDOWN = "shutdown", "the server is stopping"
    DRAINED = "drained", "nothing waits for Redis any more"


LINK_TRANSITIONS: tuple[Transition, ...] = (
    Transition(LinkTrigger.DIAL, (LinkState.IDLE, LinkState.BACKOFF), LinkState.CONNECTING,
               "open_socket", "open a non-blocking socket and start connecting"),
    Transition(LinkTrigger.WRITABLE, (LinkState.CONNECTING,), None, "check_connect",
               "read the connect's outcome (SO_ERROR): connected, the next address, or fail"),
    Transition(LinkTrigger.CONNECTED, (LinkState.CONNECTING,), LinkState.GREETING, "greet",
               "send AUTH and SELECT when asked for, then PING (publish) or SUBSCRIBE"),
    Transition(LinkTrigger.READABLE, (LinkState.GREETING, LinkState.READY, LinkState.DRAINING),
               None, "receive", "recv once; hand every complete reply to the link's role"),
    Transition(LinkTrigger.WRITABLE,
               (LinkState.GREETING, LinkState.READY, LinkState.PAUSED, LinkState.DRAINING),
               None, "flush", "send as much of the queued commands as the socket takes"),
    Transition(LinkTrigger.GREETED, (LinkState.GREETING,), LinkState.READY, "go_live",
               "publish what waits in the outbox, or deliver what the channel carries"),
    Transition(LinkTrigger.THROTTLE, (LinkState.READY,), LinkState.PAUSED, "pause_reading",
               "flow control: stop reading the channel, so Redis buffers for us a moment"),
    Transition(LinkTrigger.RESUME, (LinkState.PAUSED,), LinkState.READY, "resume_reading",
               "every congested recipient caught up (or stalled): read again"),
    Transition(LinkTrigger.FAIL,
               (LinkState.CONNECTING, LinkState.GREETING, LinkState.READY, LinkState.PAUSED),
               LinkState.BACKOFF, "schedule_retry",
               "close the socket; dial again after a capped exponential delay"),
    Transition(LinkTrigger.SHUTDOWN, (LinkState.READY, LinkState.PAUSED), LinkState.DRAINING,
               "drain", "stop reading the channel; publish what waits"),
    Transition(LinkTrigger.SHUTDOWN,
               (LinkState.IDLE, LinkState.CONNECTING, LinkState.GREETING, LinkState.BACKOFF),
               LinkState.CLOSED, "close_link", "close now; what waits is dropped and counted"),
    Transition(LinkTrigger.DRAINED, (LinkState.DRAINING,), LinkState.CLOSED, "close_link",
               "everything waiting was published"),
    Transition(LinkTrigger.FAIL, (LinkState.DRAINING,), LinkState.CLOSED, "close_link",
               "lost while draining, or the drain timed out: close, drop and count the rest"),
)

REDIS_LINK = Lifecycle("redis_link", tuple(LinkState), LinkState.IDLE, LinkState.CLOSED,
                       LINK_TRANSITIONS)

class HttpState(Documented):
    ACCEPTED = "accepted", "socket taken from the metrics or web listener, in the loop"
    HANDSHAKING = ("handshaking", "web port with --tls-cert: the TLS handshake runs (within the "
                   "time the first request has)")
    RECEIVING = ("receiving", "reads a request (h11 parses it; 5 s at most for the first); waits "
                 "for the next one on keep-alive (30 s at most)")
    RESPONDING = "responding", "the response is queued: writes it, reads nothing"
    CLOSED = "closed", "socket closed (or handed to the chat as a WebSocket), connection forgotten"


class HttpTrigger(Documented):
    START = "start", "the socket is non-blocking and registered with the loop (plain HTTP)"
    SECURE = "secure", "the same, for the web port with --tls-cert (HTTPS)"
    ESTABLISHED = "established", "the TLS handshake completed"
    READABLE = "readable", "select reported the socket readable"
    WRITABLE = "writable", "select reported the socket writable (asked only while output is queued)"
    REQUEST = "request", "a whole request arrived, or a bad one did (answered 400)"
    UPGRADE = ("upgrade", "web port: a valid WebSocket handshake for /ws, from an allowed origin "
               "(one the chat has no room for is told so on the WebSocket, then closed)")
    SENT = "sent", "the whole response was written and the connection may be reused"
    DONE = ("done", "the whole response was written and the connection must close "
            "(Connection: close, HTTP/1.0, a bad request)")
    FAIL = ("fail", "EOF, a socket or TLS error, no whole request in time, or its place given to "
            "a newcomer")


HTTP_TRANSITIONS: tuple[Transition, ...] = (
    Transition(HttpTrigger.START, (HttpState.ACCEPTED,), HttpState.RECEIVING, "await_request",
               "wait for a request (5 s at most)"),
    Transition(HttpTrigger.SECURE, (HttpState.ACCEPTED,), HttpState.HANDSHAKING, "shake",
               "start the TLS handshake"),
    Transition(HttpTrigger.READABLE, (HttpState.HANDSHAKING,), None, "shake",
               "one more handshake step; it says whether to wait to read or to write"),
    Transition(HttpTrigger.WRITABLE, (HttpState.HANDSHAKING,), None, "shake",
               "the same, when the handshake waited to write"),
    Transition(HttpTrigger.ESTABLISHED, (HttpState.HANDSHAKING,), HttpState.RECEIVING,
               "await_request", "the handshake completed: read the request"),
    Transition(HttpTrigger.READABLE, (HttpState.RECEIVING,), None, "receive",
               "recv once and feed h11; a whole request fires request (or upgrade)"),
    Transition(HttpTrigger.REQUEST, (HttpState.RECEIVING,), HttpState.RESPONDING, "respond",
               "queue the site's answer: /metrics, the page and its files, else 404/405/400 "
               "(and 400/403/426 for a WebSocket handshake it refuses)"),
    Transition(HttpTrigger.UPGRADE, (HttpState.RECEIVING,), HttpState.CLOSED, "hand_over",
               "the socket leaves this table for the connection table (upgrade), with what "
               "the client sent after its request; or, turned away, is told why and closed"),
    Transition(HttpTrigger.WRITABLE, (HttpState.RESPONDING,), None, "flush",
               "send as much of the response as the socket takes"),
    Transition(HttpTrigger.SENT, (HttpState.RESPONDING,), HttpState.RECEIVING, "next_request",
               "keep-alive: wait for the next request"),
    Transition(HttpTrigger.DONE, (HttpState.RESPONDING,), HttpState.CLOSED, "close",
               "the response said Connection: close (or the request was bad): close"),
    Transition(HttpTrigger.FAIL, (HttpState.HANDSHAKING, HttpState.RECEIVING,
                                  HttpState.RESPONDING), HttpState.CLOSED,
               "close", "EOF, a socket or TLS error, no whole request in time (5 s for the "
               "first, 30 s for the next) or its place given to a newcomer: close"),
)

HTTP = Lifecycle("http", tuple(HttpState), HttpState.ACCEPTED, HttpState.CLOSED,
                 HTTP_TRANSITIONS)
"""A metrics scraper's or a web browser's HTTP connection, up to a WebSocket upgrade."""

LIFECYCLES = (CONNECTION, REDIS_LINK, HTTP)
"""Every machine the server runs; the diagram generator draws each one."""
