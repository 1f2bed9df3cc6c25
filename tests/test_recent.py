"""History per room (``fsmchat.chat.recent``) against a plain model: what every room keeps.

The model is the rule as docs/using.md states it, written the slow way: every line of every
room in one list, in the order it was said; a room keeps at most ``limit`` of its own, and all
rooms together at most ``max_bytes``, the oldest line of all going first; a line larger than
``max_bytes`` is not kept; a room that is gone keeps nothing. Hypothesis drives both with the
same adds (single lines and runs of lines, as the chat hands them over) and rooms going, and
every room's lines, the totals and the bookkeeping's size are compared after each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC

from hypothesis import given, settings
from hypothesis import strategies as st

from fsmchat.chat.recent import FOOTER, HEADER, Budget, Recent

ROOMS = 3


@dataclass
class Model:
    limit: int
    max_bytes: int
    said: list[tuple[int, bytes]] = field(default_factory=list)  # (room, line), oldest first

    def add(self, room: int, lines: list[bytes]) -> None:
        if sum(map(len, lines)) > self.max_bytes:  # as the chat's: one by one
            for line in lines:
                if len(line) <= self.max_bytes:
                    self.add(room, [line])
            return
        self.said += [(room, line) for line in lines]
        own = [i for i, (r, _) in enumerate(self.said) if r == room]
        for i in reversed(own[:max(0, len(own) - self.limit)]):
            del self.said[i]
        while sum(len(line) for _, line in self.said) > self.max_bytes:
            del self.said[0]

    def clear(self, room: int) -> None:
        self.said = [(r, line) for r, line in self.said if r != room]

    def lines(self, room: int) -> list[bytes]:
        return [line for r, line in self.said if r == room]


LINES = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6)
STEPS = st.lists(st.one_of(st.tuples(st.just("add"), st.integers(0, ROOMS - 1), LINES),
                           st.tuples(st.just("gone"), st.integers(0, ROOMS - 1), st.just([]))),
                 max_size=80)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 6), max_bytes=st.integers(1, 120), steps=STEPS)
def test_every_room_keeps_what_the_rule_says(limit: int, max_bytes: int,
                                             steps: list[tuple[str, int, list[bytes]]]) -> None:
    budget = Budget(limit, max_bytes)
    rooms = [Recent(budget) for _ in range(ROOMS)]
    model = Model(limit, max_bytes)
    for what, room, lines in steps:
        if what == "add":
            data = b"".join(lines)
            rooms[room].add(data, lines if len(lines) > 1 else ())
            model.add(room, lines)
        else:
            rooms[room].clear()
            rooms[room] = Recent(budget)  # the chat makes a new room of that name
            model.clear(room)
        for number, recent in enumerate(rooms):
            assert list(recent.lines) == model.lines(number)
            assert recent.nbytes == sum(map(len, recent.lines))
            assert sum(count for _, count in recent.stamps) == len(recent.lines)
        assert budget.kept == len(model.said)
        assert budget.nbytes == sum(len(line) for _, line in model.said)
        assert len(budget.order) <= 2 * budget.kept + 64 + ROOMS  # bookkeeping stays bounded


def test_the_replay_is_framed_and_every_line_has_its_time() -> None:
    budget = Budget(10, 1000)
    recent = Recent(budget)
    assert recent.framed(UTC) == []  # nothing kept: no frame at all
    recent.add(b"<a> one\n")
    recent.add(b"<a> two\n<a> three\n", [b"<a> two\n", b"<a> three\n"])
    framed = recent.framed(UTC)
    assert framed[0] == HEADER and framed[-1] == FOOTER
    assert [line[6:] for line in framed[1:-1]] == [b"<a> one\n", b"<a> two\n", b"<a> three\n"]
    assert all(line[2:3] == b":" and line[5:6] == b" " and line[:5].replace(b":", b"").isdigit()
               for line in framed[1:-1])
