"""Who is who, and where: the names in use, who is in which room, where a /msg goes.

The chat asks a ``Directory`` every question about names and rooms (``/nick``, ``/who``,
``/rooms``, ``/msg``, a newcomer's ``userN``) and tells it every change (``claim``,
``release``, ``renamed``, ``moved``). This one knows this instance alone: its answers are the
chat's own members and rooms. It is the seam for presence across instances: a directory that
also knows the other instances (through Redis: ``redis/presence.py``'s ``SharedDirectory``)
overrides the questions (``holder``, ``elsewhere``, ``who``, ``rooms``), may take its time to
grant a name (``ask``: the other instances are asked first) and listens to the changes, and the
chat is given a way to make it instead (``Chat(directory=lambda members, rooms:
SharedDirectory(members, rooms, presence))``, a ``MakeDirectory``: the chat's members and rooms
exist only once the chat does); nothing else in the chat changes.

Rules it keeps:
- Names are unique by their ``skeleton`` (case and look-alike letters aside): ``holder`` says
  which name in use looks like a given one, and a name is claimed only when it says none.
- ``who`` and ``rooms`` are sorted the way people read them: names without regard to case, the
  lobby first, then the rooms by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from fsmchat.chat.text import skeleton

if TYPE_CHECKING:
    from fsmchat.chat.mode import Member
    from fsmchat.chat.rooms import Room, Rooms


MakeDirectory = Callable[["Mapping[int, Member]", "Rooms"], "Directory"]
"""What makes the chat's directory from its members (fd -> member) and rooms."""


class Directory:
    """This instance's names and rooms."""

    def __init__(self, members: Mapping[int, Member], rooms: Rooms, *,
                 shared: bool = False) -> None:
        self.members = members  # the chat's: fd -> member
        self.local_rooms = rooms
        self.shared = shared  # other instances share the chat (--redis)
        self.taken: dict[bytes, Member] = {}  # skeleton -> the member with that name

    # -- questions --------------------------------------------------------------------------

    def holder(self, name: bytes) -> bytes | None:
        """The name in use that looks like ``name`` (maybe ``name`` itself), or None."""
        member = self.taken.get(skeleton(name))
        return member.name if member is not None else None

    def find(self, name: bytes) -> Member | None:
        """The member of this instance called ``name`` (or a name that looks like it)."""
        return self.taken.get(skeleton(name))

    def elsewhere(self, name: bytes) -> bool:
        """Whether ``name``, nobody here, may be someone on another instance (a /msg to it then
        goes on the bus). Without presence, any name may be, once instances share the chat."""
        return self.shared

    def who(self, room: Room) -> list[bytes]:
        """The names of the members of ``room``."""
        members = self.members
        return sorted((members[fd].name for fd in room.readers), key=bytes.lower)

    def asking(self, member: Member) -> bytes | None:
        """The name ``member`` asked for and waits for (``ask``), if any."""
        return None

    def rooms(self) -> list[tuple[bytes, int]]:
        """Every room with members (and the lobby), with how many."""
        rooms = self.local_rooms
        others = sorted((room for room in rooms if room is not rooms.lobby),
                        key=lambda room: room.name.lower())
        return [(room.name, len(room.readers)) for room in (rooms.lobby, *others)]

    # -- changes ----------------------------------------------------------------------------

    def ask(self, member: Member, name: bytes, answer: Callable[[bytes | None], None]) -> None:
        """``member`` asks for ``name`` (``holder`` found none like it): ``answer(None)`` once it
        may have it, ``answer(holder)`` if someone elsewhere had it first. Here: at once."""
        answer(None)

    def claim(self, member: Member) -> None:
        """``member`` has its name now (``holder`` found none like it)."""
        self.taken[skeleton(member.name)] = member

    def renamed(self, member: Member, old: bytes) -> None:
        """``member``, who was ``old``, has its new name now."""
        self.taken.pop(skeleton(old), None)
        self.taken[skeleton(member.name)] = member

    def release(self, name: bytes) -> None:
        """Nobody has ``name`` any more (its member left, or took another)."""
        self.taken.pop(skeleton(name), None)

    def moved(self, member: Member, old: Room | None, new: Room | None) -> None:
        """``member`` went from ``old`` to ``new`` (None: it came, or it left)."""
