"""Chat mode's payloads on the Redis bus: a first line that says where the rest goes.

Inside the bus's envelope, a payload from a chat instance is::

    #ROOM\\n<lines for that room>        public lines of one room
    @NAME\\n<one private line for NAME>  a /msg, for whichever instance NAME is on

The head is built once per room (``Room.tag``) or per /msg, and the bus writes it after its
envelope, so the lines themselves are never copied for it. A payload without a head that is one
(from ``redis-cli PUBLISH``, or an older instance) is for the default room, whole.

Rules it keeps:
- The channel is untrusted: a head is one only if its name is a room name (``room_problem``
  finds none) or a name (``is_name``); anything else is no head, and the payload, first line
  included, goes to the default room, cleaned like every relayed line.
- A head may end in ``\\r`` (typed into ``redis-cli``): it is not part of the name.
"""

from __future__ import annotations

from enum import Enum

from fsmchat.chat.text import is_name, room_problem


class To(Enum):
    ROOM = b"#"
    PERSON = b"@"
    DEFAULT = b""  # no head: the default room


def room_head(name: bytes) -> bytes:
    return b"#%s\n" % name


def person_head(name: bytes) -> bytes:
    return b"@%s\n" % name


def route(payload: bytes) -> tuple[To, bytes, bytes]:
    """Where ``payload`` goes: (``To``, the room or person named, the lines)."""
    mark = payload[:1]
    if mark in (b"#", b"@"):
        first, newline, body = payload.partition(b"\n")
        if newline:
            name = first[1:].removesuffix(b"\r")
            if mark == b"#":
                if room_problem(name) is None:
                    return To.ROOM, name, body
            elif is_name(name):
                return To.PERSON, name, body
    return To.DEFAULT, b"", payload
