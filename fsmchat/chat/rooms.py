"""Rooms: who hears a public line. Everyone starts in ``lobby``; ``/join`` makes a room.

A room is its local readers (fd -> connection: what ``Hub.deliver`` takes as ``to``), its
history (``Recent``, with ``--history``) and its head on the bus (``#name\\n``, built once).
Rooms are found by their name in any case (``Math`` is ``math``); a room shows the name its
first member gave it. A room other than the lobby is made by the first ``/join`` and gone with
its last member; its history stays (within the history's budget, ``chat/recent.py``), and so do
the histories of rooms only other instances have members in: whoever joins it later, here or
elsewhere, after a restart or not, is given the same past.

Rules it keeps:
- The one-room case costs what the chat cost before rooms: a line goes to the sender's room's
  readers, a mapping kept as members come and go (nothing is built per line), with its head
  handed to the bus beside it, not joined to it.
- A member is in exactly one room; ``Rooms.enter`` and ``Rooms.leave`` are the only ways in
  and out, and the room they leave empty is gone at once.
- Bad input changes nothing: ``/join`` with a bad name gets one ``*** `` line, the room the
  member was in stays theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fsmchat.chat.commands import COMMANDS, Call
from fsmchat.chat.payload import room_head
from fsmchat.chat.recent import Budget, Recent
from fsmchat.chat.text import room_problem

if TYPE_CHECKING:
    from fsmchat.connection import Connection as Client

LOBBY = b"lobby"
"""The default room: everyone starts there, ``/part`` goes back there, and it is never gone."""


def room_key(name: bytes) -> bytes:
    """What finds a room: its name in lower case (a room name is valid UTF-8)."""
    return name.decode().casefold().encode() if not name.isascii() else name.lower()


@dataclass(slots=True, eq=False)
class Room:
    name: bytes  # as its first member typed it
    readers: dict[int, Client] = field(default_factory=dict)  # its local members, by fd
    recent: Recent | None = None  # its history (None: no --history)
    tag: bytes = b""  # its head on the bus: b"#name\n"

    def __post_init__(self) -> None:
        self.tag = room_head(self.name)


class Rooms:
    """Every room with a local member, and the lobby."""

    __slots__ = ("budget", "by_key", "histories", "lobby")

    def __init__(self, budget: Budget | None) -> None:
        self.budget = budget  # what all rooms' histories share; None: no history
        self.histories: dict[bytes, Recent] = {}  # room key -> its history, room or no room
        self.by_key: dict[bytes, Room] = {}
        self.lobby = Room(LOBBY, recent=self.history(LOBBY))
        self.by_key[room_key(LOBBY)] = self.lobby

    def find(self, name: bytes) -> Room | None:
        return self.by_key.get(room_key(name))

    def history(self, name: bytes) -> Recent | None:
        """Room ``name``'s history, whether the room has members here or not (made if none
        was kept); None without --history."""
        if self.budget is None:
            return None
        key = room_key(name)
        recent = self.histories.get(key)
        if recent is None:
            histories = self.histories
            if len(histories) > 2 * len(self.by_key) + 64:  # the histories emptied by the budget
                for gone in [key for key, kept in histories.items()
                             if not kept.lines and key not in self.by_key]:
                    del histories[gone]
            recent = histories[key] = Recent(self.budget)
        return recent

    def enter(self, name: bytes, client: Client) -> Room:
        """``client`` is in room ``name`` now (made if nobody was there)."""
        key = room_key(name)
        room = self.by_key.get(key)
        if room is None:
            room = self.by_key[key] = Room(name, recent=self.history(name))
        room.readers[client.fd] = client
        return room

    def leave(self, room: Room, client: Client) -> None:
        """``client`` left ``room``; a room left empty is gone (but the lobby), and its
        history with it only if it has none."""
        del room.readers[client.fd]
        if not room.readers and room is not self.lobby:
            key = room_key(room.name)
            del self.by_key[key]
            if room.recent is not None and not room.recent.lines:
                del self.histories[key]

    def __iter__(self) -> Iterator[Room]:
        return iter(self.by_key.values())


# -- the commands ---------------------------------------------------------------------------


@COMMANDS.command("join", "/join ROOM", "go to ROOM (made if nobody is there)")
def _join(call: Call) -> bool:
    name = call.argument.removeprefix(b"#")
    if not call.argument:
        call.usage()
        return False
    problem = room_problem(name)
    if problem is not None:
        call.answer(b"join: " + problem)
        return False
    return call.chat.move(call.client, call.member, name)


@COMMANDS.command("part", "/part", "go back to the lobby")
def _part(call: Call) -> bool:
    return call.chat.move(call.client, call.member, LOBBY)


@COMMANDS.command("rooms", "/rooms", "list the rooms, with how many are in each")
def _rooms(call: Call) -> bool:
    rooms = call.chat.directory.rooms()
    call.answer(b"%d room%s: %s" % (len(rooms), b"" if len(rooms) == 1 else b"s",
                                    b", ".join(b"%s (%d)" % room for room in rooms)))
    return False
