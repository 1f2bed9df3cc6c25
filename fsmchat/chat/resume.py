"""Resume: a page that lost its connection comes back and is given only what it missed.

A WebSocket client that asked for the subprotocol ``fsmchat.ids`` (``web/site.py``) reads the
id of every room message (``Hub.msg_id``) in front of its frame (``web/websocket.py``), the
replayed history's too, and the id of each public line of its own in a frame of its own (the
server does not echo them: the page shows them as it sends them). When it comes back, to this
instance or any other one of the same Redis, it asks ``/ws?room=ROOM&after=ID,ID,...`` (the
last ids it showed, newest last; ``Resume``) and is seated in that room, and instead of the
room's history it is given what was said after them (``Recent.missed``)::

    *** missed while you were away:
    14:02 <alice> are you still there?
    *** end of missed messages

nothing at all when nothing was missed (the page says "connected again" itself: a phone that
loses its network every few minutes should not fill its log with "nothing new"), and when none
of those ids is kept any more, one line saying the gap is too old, then the room's history as
any newcomer gets it.

Rules it keeps:
- The choice is made once, as the client is greeted: a later ``/join`` is given its room's
  history as anyone is.
- A client that asked for nothing gets exactly what it always got: the framed history, one
  queue entry per line. An id client's replay is one frame per message, after its id.
- Missed lines are shown after their time, as history is: they are the past too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import tzinfo
from itertools import islice
from typing import TYPE_CHECKING

from fsmchat.chat.recent import FOOTER, HEADER, Recent

if TYPE_CHECKING:
    from fsmchat.connection import Connection as Client
    from fsmchat.hub import Hub

MISSED = b"*** missed while you were away:\n"
END_OF_MISSED = b"*** end of missed messages\n"
TOO_OLD = b"*** some messages said while you were away are too old to be shown again\n"
NOT_KEPT = b"*** this server keeps no history: what was said while you were away is not shown\n"


@dataclass(frozen=True, slots=True)
class Resume:
    """What a WebSocket client asked for in its handshake (``web/site.py`` parses it)."""

    ids: bool = False  # its frames carry the ids of their messages (``fsmchat.ids``)
    room: bytes = b""  # the room to seat it in (a valid room name; b"": the lobby)
    after: tuple[bytes, ...] = ()  # the ids of the last messages it showed, newest last


def messages(recent: Recent, zone: tzinfo) -> list[tuple[bytes, list[bytes]]]:
    """Every message the history keeps, oldest first: (its id, its lines after their time)."""
    lines = iter(recent.stamped(zone))
    return [(msg_id, list(islice(lines, count))) for msg_id, count in recent.ids]


def replay(hub: Hub, client: Client, recent: Recent | None, zone: tzinfo,
           after: Sequence[bytes]) -> None:
    """A room's past for ``client``, as it asked (``client.asked``): what it missed after
    ``after`` (the ids it showed; empty: not coming back), or the room's history; each message
    after its id if it reads ids."""
    ids = client.asked is not None and client.asked.ids
    if after:
        missed = recent.missed(after, zone) if recent is not None else None
        if missed is not None:
            if missed:
                _framed(hub, client, (MISSED, END_OF_MISSED), missed, ids=ids)
            return
        hub.tell(client, TOO_OLD if recent is not None else NOT_KEPT)
    if recent is None or not recent.lines or not hub.in_chat(client):
        return
    if ids:
        _framed(hub, client, (HEADER, FOOTER), messages(recent, zone), ids=True)
    else:
        hub.replay(client, recent.framed(zone))


def _framed(hub: Hub, client: Client, frame: tuple[bytes, bytes],
            said: Sequence[tuple[bytes, list[bytes]]], *, ids: bool) -> None:
    """Messages between two ``*** `` lines (``frame``): one entry per line, or one frame per
    message after its id (``Hub.delivering`` says it, as for a live message)."""
    header, footer = frame
    if not ids:
        hub.replay(client, [header, *(line for _, lines in said for line in lines), footer])
        return
    hub.replay(client, [header])
    try:
        for msg_id, lines in said:
            if not hub.in_chat(client):  # what it was given took it past its limit
                return
            hub.delivering = msg_id
            hub.replay(client, [b"".join(lines)])
    finally:
        hub.delivering = b""
    if hub.in_chat(client):
        hub.replay(client, [footer])
