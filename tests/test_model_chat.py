"""The whole server in chat mode, driven in-process by hypothesis as in test_model.py, with
lines, partial lines, commands (``/quit`` and ``/nick`` among them) and garbage.

The invariants: no trigger is ever invalid, no queue passes its limit, every connection ends
``closed``, and what a client was sent is whole lines, each a message (``<name> ...``), an action
(``* name ...``), a notice (``*** ...``) or a private line (``*ann* ...``, ``-> *ann* ...``), maybe
after a time (replayed history), with no control character but the newline that ends it.
"""

from __future__ import annotations

import re

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from test_model import CLEAN, LIMIT, Chat, ModelServer, ScriptedSocket

from fsmchat.lifecycle import State
from fsmchat.options import Options

LINE = re.compile(rb"([0-9]{2}:[0-9]{2} )?"  # replayed history
                  rb"(<[A-Za-z0-9_-]{1,16}> |\*\*\* |\* [A-Za-z0-9_-]{1,16} "
                  rb"|(-> )?\*[A-Za-z0-9_-]{1,16}\* )"  # a private message, and its echo
                  rb"[^\x00-\x08\x0a-\x1f\x7f]*")

PIECES = st.sampled_from([
    b"hello\n", b"/quit\n", b"/nick ann\n", b"/nick Ann\n", b"/who\n", b"/me waves\n",
    b"//x\n", b"/bogus\n", b"\n", b"\r\n", b"\x1b[2J", b"\xff\xfe", b"half", b"x" * 300,
    b"/join math\n", b"/JOIN Math\n", b"/part\n", b"/rooms\n", b"/msg ann psst\n",
    b"/msg user1 hi\n", b"/join \x07\n",
])


class ChatMode(Chat):
    def __init__(self) -> None:
        super().__init__()
        self.server = ModelServer(Options(host=None, port=0, max_queue_bytes=LIMIT,
                                          drain_timeout=1.0, mode="chat", max_line=64,
                                          history=5, history_bytes=LIMIT // 4),
                                  [(self.listener, None)], self.server.log, loop=self.loop)

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5), pieces=st.lists(PIECES, min_size=1, max_size=6))
    def client_sends(self, who: int, pieces: list[bytes]) -> None:
        self.sockets[who % len(self.sockets)].inbound.append(b"".join(pieces))

    @precondition(lambda self: self.sockets)
    @rule(who=st.integers(0, 5))
    def readable(self, who: int) -> None:
        self.loop.dispatch((self.sockets[who % len(self.sockets)].fd,), ())

    @invariant()
    def bytes_arrive_in_order_and_once(self) -> None:
        for sock in self.sockets:
            lines = bytes(sock.received).split(b"\n")
            lines.pop()  # the unfinished rest (empty once everything arrived)
            for line in lines:
                assert LINE.fullmatch(line), line

    def check_delivered(self, sock: ScriptedSocket, expected: bytearray, reason: str) -> None:
        """Whole lines only (the invariant checks each), all of them for a clean close."""
        self.bytes_arrive_in_order_and_once()
        if reason in CLEAN | {"quit"} and sock.send_error is None:
            assert bytes(sock.received[-1:]) in (b"", b"\n"), reason


ChatMode.TestCase.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
test_chat_mode_model = ChatMode.TestCase


def test_a_sender_closed_by_the_notices_its_message_caused_reads_no_further() -> None:
    """A's message takes B past its limit; B's leave notice takes A past its own: A is sent
    away in the middle of its read, and its next line (a command answered to A alone) must not
    revive it in the chat or the loop. Each gets the line that says why, alone, then closes."""
    model = ChatMode()
    try:
        model.connect()
        model.connect()
        a, b = model.conns
        for conn, room in ((a, 10), (b, 3)):  # both stopped reading: almost no room left
            conn.enqueue(b"x" * (LIMIT - room - conn.queue.nbytes))
        model.sockets[0].inbound.append(b"hello there\n/who\n")
        model.loop.dispatch((a.fd,), ())
        model.server.end_of_turn()
        # Both are out of the chat, read no more, and wait to take the line that says why.
        assert not model.server.hub.readers
        assert (a.state, b.state) == (State.DRAINING, State.DRAINING)
        # Were either still read, the loop would call its handler for a read (InvalidTrigger in
        # draining); A's /who would be answered.
        model.loop.dispatch((a.fd, b.fd), (a.fd, b.fd))
        model.no_trigger_is_ever_invalid()
        for sock in model.sockets:
            sock.window = 1 << 20
        model.loop.dispatch((), (a.fd, b.fd))
        model.server.end_of_turn()
        assert not model.server.hub.connections
        # What waited was dropped: each gets the line alone, and A nothing of its /who.
        farewell = b"*** closed: you read too slowly (over 4 KiB waited for you, now dropped)\n"
        assert [bytes(sock.received) for sock in model.sockets] == [farewell, farewell]
        model.loop.dispatch((a.fd, b.fd), (a.fd, b.fd))  # closed: never watched again
        model.no_trigger_is_ever_invalid()
    finally:
        model.listener.close()
