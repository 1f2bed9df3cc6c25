"""Chat mode's rules without sockets: the ``Chat`` layer fed lines, a recording hub around it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from fsmchat.chat.directory import Directory
from fsmchat.chat.mode import Chat
from fsmchat.chat.rooms import Room
from fsmchat.connection import Connection


@dataclass
class Person:
    fd: int
    peer: str = "127.0.0.1:1"
    here: bool = True
    reason: str = "peer_closed"  # why it leaves, when it does
    asked: None = None  # what a WebSocket client asked for (chat/resume.py): nothing


class Flow:
    """The recording hub's flow control: every question counted, answered by ``holding``."""

    def __init__(self, room: RecordingHub) -> None:
        self.room = room

    @property
    def holding(self) -> bool:
        self.room.asked += 1
        return self.room.holding

    def holds(self, sender: Person) -> bool:
        self.room.asked += 1
        return self.room.holding

    def pause_if_held(self, sender: Person) -> None:
        self.room.held_back += 1

    def wait(self, sender: Person) -> None:
        self.room.waiting.append(sender.fd)


@dataclass
class RecordingHub:
    """A hub that records what the chat asks for: (to, bytes) pairs; "*" is everyone but the
    sender."""

    said: list[tuple[str, bytes]] = field(default_factory=list)
    messages_in: int = 0
    held_back: int = 0  # pause_if_held calls
    asked: int = 0  # holds calls, and looks at holding
    holding: bool = False  # what flow control answers: it holds the sender back
    waiting: list[int] = field(default_factory=list)  # wait calls, by fd
    lines: int = 0  # lines broadcast or delivered (a run of them may be one call)
    log: Any = field(default_factory=lambda: structlog.get_logger().bind())
    seq: int = 0  # messages broadcast
    delivering: bytes = b""

    def msg_id(self, seq: int) -> bytes:
        return b"0123456789abcdef-%d" % seq

    @property
    def flow(self) -> Flow:
        return Flow(self)

    @property
    def counts(self) -> RecordingHub:
        return self

    def broadcast(self, data: bytes, exclude: Person | None = None,
                  lines: Sequence[bytes] = (), to: object = None, head: bytes = b"") -> None:
        assert not lines or b"".join(lines) == data
        self.seq += 1
        self.said.append((f"* but {exclude.fd}" if exclude else "*", data))
        self.lines += len(lines) or 1

    def deliver(self, data: bytes, sender: Person | None = None,
                lines: Sequence[bytes] = (), to: object = None) -> None:
        assert sender is None and (not lines or b"".join(lines) == data)
        self.said.append(("here", data))
        self.lines += len(lines) or 1

    def publish(self, data: bytes, head: bytes = b"") -> None:
        self.said.append(("elsewhere", data))

    def tell(self, client: Person, data: bytes) -> None:
        self.said.append((str(client.fd), data))

    def quit(self, client: Person) -> None:
        client.here = False

    def in_chat(self, client: Person) -> bool:
        return client.here

    def take(self) -> list[tuple[str, bytes]]:
        said, self.said = self.said, []
        return said


def setup(count: int, entry_bytes: int = 1024) -> tuple[Chat, RecordingHub, list[Connection]]:
    room = RecordingHub()
    chat = Chat(cast(Any, room), max_line=32, entry_bytes=entry_bytes)
    people = [cast(Connection, Person(fd)) for fd in range(10, 10 + count)]
    for person in people:
        chat.greet(person)
        chat.joined(person)
    room.take()
    return chat, room, people


def test_names_are_unique_whatever_the_case_and_refusals_change_nothing() -> None:
    chat, room, (a, b) = setup(2)
    chat.received(a, b"/nick Alice\n")
    assert room.take() == [("10", b"*** you are now Alice\n"),
                           ("* but 10", b"*** user1 is now Alice\n")]
    chat.received(b, b"/nick ALICE\n/nick no way\n/nick\n")
    said = room.take()
    assert [to for to, _ in said] == ["11", "11", "11"]
    assert said[0][1] == b"*** nick: ALICE is taken\n"
    assert said[1][1].startswith(b'*** nick: "no way" is not a name')
    assert said[2][1] == b"*** usage: /nick NAME\n"
    chat.received(b, b"/who\n")
    assert room.take() == [("11", b"*** 2 in lobby: Alice, user2\n")]


def test_a_new_name_skips_names_taken_by_hand() -> None:
    chat, room, (a,) = setup(1)
    chat.received(a, b"/nick user2\n")
    room.take()
    newcomer = cast(Connection, Person(20))
    chat.greet(newcomer)
    assert room.take() == [("20", b"*** welcome, you are user3 (/help lists the commands)\n")]


def test_after_quit_the_rest_of_the_read_is_ignored() -> None:
    chat, room, (a, _) = setup(2)
    chat.received(a, b"bye all\n/quit\nnot said\n")
    assert room.take() == [("* but 10", b"<user1> bye all\n"), ("10", b"*** bye\n")]
    assert room.messages_in == 2  # the lines read up to /quit
    chat.left(a)
    assert room.take() == [("* but 10", b"*** user1 left lobby\n")]


def test_a_partial_line_is_said_when_its_sender_leaves() -> None:
    chat, room, (a, _) = setup(2)
    chat.received(a, b"half a")
    assert room.take() == []
    chat.left(a)
    assert room.take() == [("* but 10", b"<user1> half a\n"),
                           ("* but 10", b"*** user1 left lobby\n")]
    chat.left(a)  # twice is nothing
    assert room.take() == []


def test_an_unfinished_line_is_dropped_on_a_forced_close_and_never_a_command() -> None:
    chat, room, (a, b) = setup(2)
    chat.received(a, b"cut short")
    a.reason = "queue_limit"
    chat.left(a)
    chat.received(b, b"/quit")  # EOF right after: a command is not said, nor done
    chat.left(b)
    assert room.take() == [("* but 10", b"*** user1 left lobby\n"),
                           ("* but 11", b"*** user2 left lobby\n")]


def test_a_client_closed_by_its_own_announcement_reads_no_further() -> None:
    chat, room, (a, _) = setup(2)
    original = room.broadcast

    def announce_then_close(data: bytes, exclude: Person | None = None,
                            lines: Sequence[bytes] = (), to: object = None,
                            head: bytes = b"") -> None:
        original(data, exclude, lines, to, head)
        if exclude is not None:
            exclude.here = False  # as when a leave notice took it past its queue limit

    room.broadcast = announce_then_close  # type: ignore[method-assign]
    chat.received(a, b"first\n/nick late\n/who\nsecond\n")
    assert room.take() == [("* but 10", b"<user1> first\n")]
    assert chat.directory.holder(b"late") is None


def test_commands_escapes_and_empty_lines() -> None:
    chat, room, (a, _) = setup(2)
    chat.received(a, b"//slash\n\n   \n/me \x1b[2Jdances\n/frobnicate now\n")
    said = room.take()
    assert said[:2] == [("* but 10", b"<user1> /slash\n"), ("* but 10", b"* user1 ^[[2Jdances\n")]
    assert said[2][0] == "10" and said[2][1].startswith(b"*** unknown command /frobnicate (")
    assert len(said) == 3
    assert room.held_back == 1  # flow control held back once per read, not per line


def test_long_lines_are_cut_and_counted() -> None:
    chat, room, (a, _) = setup(2)
    lines_before = room.lines
    chat.received(a, b"x" * 70 + b"\n")
    said = room.take()
    # The three pieces of one read are one announce (one queue entry per recipient), three lines.
    assert said == [("* but 10", (b"<user1> " + b"x" * 32 + b"\n") * 2
                     + b"<user1> " + b"x" * 6 + b"\n")]
    assert room.lines - lines_before == 3
    assert chat.cuts() == 1
    chat.left(a)
    assert chat.cuts() == 1  # a member's cuts outlive it


def test_at_shutdown_everyone_is_told_and_leaves_are_news_elsewhere_only() -> None:
    chat, room, (a, b) = setup(2)
    chat.received(a, b"unfinished")
    chat.stopping()
    a.reason = b.reason = "server_shutdown"
    chat.left(a)
    chat.left(b)
    assert room.take() == [("here", b"*** the server is shutting down\n"),
                           ("elsewhere", b"*** user1 left lobby\n"),
                           ("elsewhere", b"*** user2 left lobby\n")]


def test_one_read_goes_out_in_bounded_entries_and_waits_when_held_back() -> None:
    chat, room, (a, _) = setup(2, entry_bytes=40)
    lines = [b"line %d" % i for i in range(9)]
    messages = [b"<user1> %s\n" % line for line in lines]  # 15 bytes each: two to an entry
    before = room.lines
    room.holding = True  # a recipient went over the high-water mark with the first entry
    chat.received(a, b"".join(line + b"\n" for line in lines))
    assert room.take() == [("* but 10", b"".join(messages[:2]))]
    assert room.waiting == [10] and room.messages_in == 2 and room.held_back == 0
    chat.resumed(a)  # still held: one more entry, then it waits again
    assert room.take() == [("* but 10", b"".join(messages[2:4]))]
    room.holding = False
    chat.resumed(a)
    assert room.take() == [("* but 10", b"".join(messages[4:6])),
                           ("* but 10", b"".join(messages[6:8])), ("* but 10", messages[8])]
    assert room.waiting == [10, 10] and room.messages_in == 9
    assert room.lines - before == 9


def test_held_lines_go_first_and_are_said_at_shutdown_but_dropped_on_a_forced_close() -> None:
    chat, room, (a, b) = setup(2, entry_bytes=16)
    room.holding = True
    chat.received(a, b"one\ntwo\nthree\n")
    chat.received(b, b"uno\ndos\n")
    assert room.take() == [("* but 10", b"<user1> one\n"), ("* but 11", b"<user2> uno\n")]
    room.holding = False
    chat.received(a, b"four\n")  # (not read while held, but if it were: the held lines first)
    assert room.take() == [("* but 10", b"<user1> two\n"), ("* but 10", b"<user1> three\n"),
                           ("* but 10", b"<user1> four\n")]
    b.reason = "queue_limit"
    chat.left(b)
    assert room.take() == [("* but 11", b"*** user2 left lobby\n")]
    room.holding = True
    chat.received(a, b"five\nsix\n")
    room.take()
    chat.stopping()
    a.reason = "server_shutdown"
    chat.left(a)
    assert room.take() == [("here", b"*** the server is shutting down\n"),
                           ("elsewhere", b"<user1> six\n"),
                           ("elsewhere", b"*** user1 left lobby\n")]


def test_names_that_look_alike_are_not_both_given_out() -> None:
    chat, room, (a, b, c) = setup(3)
    chat.received(a, b"/nick b0b\n")
    room.take()
    chat.received(b, b"/nick BOB\n/nick bob\n")
    assert room.take() == [("11", b"*** nick: BOB looks too much like b0b, who is here\n"),
                           ("11", b"*** nick: bob looks too much like b0b, who is here\n")]
    chat.received(c, b"/nick user2-O\n")  # like user2-0, whom nobody has
    assert room.take() == [("12", b"*** you are now user2-O\n"),
                           ("* but 12", b"*** user3 is now user2-O\n")]
    chat.received(b, b"/nick user2-0\n")
    assert room.take() == [("11", b"*** nick: user2-0 looks too much like user2-O, who is "
                                  b"here\n")]
    chat.left(a)
    room.take()
    chat.received(b, b"/nick bob\n")  # free again: b0b left
    assert room.take()[0] == ("11", b"*** you are now bob\n")


def test_relayed_payloads_are_cleaned_line_by_line() -> None:
    chat, room, _ = setup(1)
    chat.relayed(b"<bob> hi\n")
    chat.relayed(b"one\r\ntwo\x1b")
    chat.relayed(b"")
    assert room.take() == [("here", b"<bob> hi\n"), ("here", b"one\ntwo^[\n")]


def test_a_relayed_payload_is_cut_like_a_read_and_waits_between_entries_when_held() -> None:
    chat, room, _ = setup(1, entry_bytes=40)  # max_line 32
    long = "é".encode() * 20  # 40 bytes: cut at a character boundary, after 32
    chat.relayed(long + b"\n" + b"a" * 20 + b"\nb\n")
    assert room.take() == [("here", "é".encode() * 16 + b"\n"),
                           ("here", "é".encode() * 4 + b"\n" + b"a" * 20 + b"\n" + b"b\n")]
    assert chat.cuts() == 1
    room.holding = True
    chat.relayed(b"x" * 30 + b"\n" + b"y" * 30 + b"\n")
    chat.relayed(b"z\n")  # newer: after what waits
    assert room.take() == [("here", b"x" * 30 + b"\n")]
    assert [line for _, line, _, _ in chat.relaying] == [b"y" * 30 + b"\n", b"z\n"]
    room.holding = False
    chat.relay_on()
    assert room.take() == [("here", b"y" * 30 + b"\nz\n")]
    room.holding = True
    chat.relayed(b"x" * 30 + b"\n" + b"y" * 30 + b"\n")
    room.take()
    chat.stopping()  # what waits is said before the notice
    assert room.take() == [("here", b"y" * 30 + b"\n"),
                           ("here", b"*** the server is shutting down\n")]


def test_a_directory_of_its_own_answers_for_names_and_rooms() -> None:
    """The seam for presence: the chat asks the directory it was given how to make, not its
    own members, whether a name is taken, who is in a room and which rooms there are."""

    class Elsewhere(Directory):
        def holder(self, name: bytes) -> bytes | None:
            return b"bob" if name.lower() == b"bob" else super().holder(name)

        def who(self, room: Room) -> list[bytes]:
            return sorted([*super().who(room), b"bob"])

        def rooms(self) -> list[tuple[bytes, int]]:
            return [(name, count + 1) for name, count in super().rooms()]

    room = RecordingHub()
    chat = Chat(cast(Any, room), max_line=32,
                directory=Elsewhere)
    a = cast(Connection, Person(10))
    chat.greet(a)
    chat.joined(a)
    room.take()
    chat.received(a, b"/nick Bob\n/who\n/rooms\n")
    assert room.take() == [("10", b"*** nick: Bob is taken (on another server)\n"),
                           ("10", b"*** 2 in lobby: bob, user1\n"),
                           ("10", b"*** 1 room: lobby (2)\n")]
