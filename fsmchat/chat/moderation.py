"""Moderators: operators (accounts marked ``op``, once logged in) may ``/kick``, ``/mute`` and set
the ``/topic``; and the command table of a chat with accounts.

- ``/kick NAME [reason]``: NAME is told ``*** kicked by alice: reason`` and closed (reason
  ``kicked``, through the hub's ``close_with``); NAME's room sees ``*** bob was kicked by
  alice: reason`` (then, as for any leave, ``*** bob left lobby``).
- ``/mute NAME [minutes]`` (10 by default, 0 lifts it): what NAME says (lines, ``/me``,
  ``/msg``) goes to nobody, and NAME is answered ``*** you are muted for N more minutes``;
  commands that say nothing still work. NAME's room is told who muted whom. A mute belongs to
  the connection: it ends with it.
- ``/topic TEXT``: the topic of the operator's room, shown to whoever comes into the room (after
  the welcome, or ``*** you are now in``, before the history) and to anyone in it by ``/topic``
  alone; setting it is for operators. A room that is gone (empty) takes its topic with it.

Rules it keeps:
- Every action is an info event naming who did it (``by``) and to whom; a refusal (not an
  operator, no such name here, a bad number) is one ``*** `` line and changes nothing.
- Kicks and mutes reach members of this instance only; the notices go to the room on every
  instance, as any public line, and to the operator if it is in another room. Topics are kept
  per instance: other instances show the notice, not the topic, to their newcomers.
- A mute costs the chat nothing while nobody is muted: a member's ``gag`` is set only while it
  is muted, and cleared the first time it is asked after the mute ran out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fsmchat.chat.commands import COMMANDS, Call, Command, CommandTable, Handler
from fsmchat.chat.login import Login
from fsmchat.chat.rooms import Room, room_key
from fsmchat.chat.text import clean, is_name
from fsmchat.hub import Extension
from fsmchat.reasons import Reason

if TYPE_CHECKING:
    from fsmchat.chat.mode import Chat, Member
    from fsmchat.connection import Connection as Client

MUTE_MINUTES = 10
"""How long ``/mute NAME`` mutes, without a number."""

MUTE_MAX = 7 * 24 * 60
"""The longest mute, in minutes: a week."""

SPEAKING = ("me", "msg")
"""Commands whose words reach others: a muted member's are answered and go to nobody."""


class Moderation(Extension):
    """Kicks, mutes and the rooms' topics of one chat."""

    def __init__(self, chat: Chat, clock: Callable[[], float] = time.monotonic) -> None:
        self.chat = chat
        self.hub = chat.hub
        self.clock = clock
        self.muted: dict[int, float] = {}  # fd -> when its mute ends (the clock's)
        self.topics: dict[bytes, Topic] = {}  # room_key -> its topic (while the room lasts)
        chat.entering = self.entering

    # -- the hub's and the chat's hooks -------------------------------------------------------

    def left(self, client: Client) -> None:
        self.muted.pop(client.fd, None)

    def entering(self, client: Client, room: Room) -> None:
        """A member comes into ``room`` (a newcomer, or by /join): it is shown the topic."""
        topic = self._topic(room)
        if topic is not None:
            self.hub.tell(client, topic.line())

    def _topic(self, room: Room) -> Topic | None:
        """``room``'s topic; one set for a room that was gone since is forgotten."""
        key = room_key(room.name)
        topic = self.topics.get(key)
        if topic is not None and topic.room is not room:
            del self.topics[key]
            return None
        return topic

    # -- mutes --------------------------------------------------------------------------------

    def gagged(self, client: Client) -> bool:
        """Whether ``client`` is muted now (it is told so); a mute that ran out is lifted."""
        until = self.muted.get(client.fd)
        left = (until or 0.0) - self.clock()
        if left <= 0:
            self._unmute(client.fd)
            return False
        minutes = math.ceil(left / 60)
        self.hub.tell(client, b"*** you are muted for %d more minute%s\n"
                      % (minutes, b"" if minutes == 1 else b"s"))
        return True

    def _unmute(self, fd: int) -> None:
        self.muted.pop(fd, None)
        member = self.chat.members.get(fd)
        if member is not None:
            member.gag = None

    def quiet(self, handler: Handler) -> Handler:
        """``handler`` for a command that speaks: not while the caller is muted."""
        def speaking(call: Call) -> bool:
            if call.member.gag is not None and call.member.gag(call.client):
                return False
            return handler(call)

        return speaking

    # -- the commands ---------------------------------------------------------------------------

    def _target(self, call: Call, name: bytes, verb: bytes) -> Member | None:
        """The member of this instance that ``name`` names (any case, look-alikes), or None
        (the caller is answered)."""
        if not is_name(name):
            call.answer(b'%s: "%s" is not a name' % (verb, clean(name)))
            return None
        member = self.chat.directory.find(name)
        if member is None or self.chat.members.get(member.client.fd) is not member:
            call.answer(b"%s: nobody called %s here" % (verb, name))
            return None
        if member is call.member:
            call.answer(b"%s: that is you" % verb)
            return None
        return member

    def _announce(self, call: Call, member: Member, line: bytes) -> None:
        """A moderation notice for ``member``'s room (it is told apart), and for the operator
        if it is elsewhere."""
        self.chat.say(member.room, line, member.client)
        if call.member.room is not member.room:
            self.hub.tell(call.client, line)

    def kick(self, call: Call) -> bool:
        """``/kick NAME [reason]``."""
        name, _, why = call.argument.partition(b" ")
        if not name:
            call.usage()
            return False
        member = self._target(call, name, b"kick")
        if member is None:
            return False
        client = member.client
        why = clean(why.strip(b" "))
        by = call.member.name
        said = b": " + why if why else b""
        text = why.decode(errors="replace")  # (clean made it UTF-8 already)
        self.hub.log.info("chat.kick", fd=client.fd, peer=client.peer, name=member.name.decode(),
                          by=by.decode(), reason=text)
        self._announce(call, member, b"*** %s was kicked by %s%s\n" % (member.name, by, said))
        self.hub.close_with(client, Reason.KICKED, b"*** kicked by %s%s\n" % (by, said))
        return True

    def mute(self, call: Call) -> bool:
        """``/mute NAME [minutes]``."""
        name, _, text = call.argument.partition(b" ")
        text = text.strip(b" ")
        if not name:
            call.usage()
            return False
        minutes = MUTE_MINUTES
        if text:
            if not text.isdigit() or int(text) > MUTE_MAX:
                call.answer(b"mute: minutes are a whole number from 0 (lifts a mute) to %d"
                            % MUTE_MAX)
                return False
            minutes = int(text)
        member = self._target(call, name, b"mute")
        if member is None:
            return False
        client = member.client
        by = call.member.name
        self.hub.log.info("chat.mute", fd=client.fd, peer=client.peer, name=member.name.decode(),
                          by=by.decode(), minutes=minutes)
        if not minutes:
            self._unmute(client.fd)
            self.hub.tell(client, b"*** %s lifted your mute\n" % by)
            self._announce(call, member, b"*** %s lifted the mute of %s\n" % (by, member.name))
            return True
        self.muted[client.fd] = self.clock() + minutes * 60
        member.gag = self.gagged
        plural = b"" if minutes == 1 else b"s"
        self.hub.tell(client, b"*** you are muted by %s for %d minute%s\n" % (by, minutes, plural))
        self._announce(call, member, b"*** %s was muted by %s for %d minute%s\n"
                       % (member.name, by, minutes, plural))
        return True

    def topic_command(self, call: Call) -> bool:
        """``/topic`` shows the room's topic; ``/topic TEXT`` (operators) sets it."""
        room = call.member.room
        if not call.argument:
            topic = self._topic(room)
            if topic is not None:
                self.hub.tell(call.client, topic.line())
            else:
                call.answer(b"no topic is set in %s" % room.name)
            return False
        if not call.member.operator:
            call.answer(b"topic: only operators set the topic")
            return False
        for key, old in list(self.topics.items()):  # (the topics of rooms gone since)
            if self.chat.rooms.find(old.room.name) is not old.room:
                del self.topics[key]
        topic = self.topics[room_key(room.name)] = Topic(room, clean(call.argument),
                                                         call.member.name)
        self.hub.log.info("chat.topic", fd=call.client.fd, by=topic.by.decode(),
                          room=room.name.decode(), topic=topic.text.decode(errors="replace"))
        self.hub.tell(call.client, b"*** you set the topic of %s: %s\n" % (room.name, topic.text))
        self.chat.say(room, b"*** %s set the topic of %s: %s\n" % (topic.by, room.name,
                                                                   topic.text), call.client)
        return True


@dataclass(frozen=True, slots=True)
class Topic:
    room: Room  # the room it was set for (a room of that name made later has none)
    text: bytes  # cleaned
    by: bytes  # who set it

    def line(self) -> bytes:
        return b"*** topic of %s: %s (set by %s)\n" % (self.room.name, self.text, self.by)


def commands_with_accounts(login: Login, moderation: Moderation,
                           base: CommandTable = COMMANDS) -> CommandTable:
    """``base``'s commands, in order, with ``/nick`` that knows accounts and the speaking ones
    quiet while muted; then ``/login``, ``/topic``, ``/kick`` and ``/mute``."""
    table = CommandTable()
    for given in base:
        command = given
        if given.name == "nick":
            command = replace(given, usage="/nick NAME [PASSWORD]",
                              help="take another name (an account's: with its password)",
                              handler=login.nick(given.handler))
        elif given.name in SPEAKING:
            command = replace(given, handler=moderation.quiet(given.handler))
        table.register(command)
    for command in (
        Command("login", "/login NAME PASSWORD", "log in to your account and take its name",
                login.login),
        Command("topic", "/topic [TEXT]", "show the topic; operators set it",
                moderation.topic_command),
        Command("kick", "/kick NAME [REASON]", "close NAME's connection", moderation.kick,
                operator_only=True),
        Command("mute", "/mute NAME [MINUTES]",
                f"what NAME says goes to nobody ({MUTE_MINUTES} minutes; 0 lifts it)",
                moderation.mute, operator_only=True),
    ):
        table.register(command)
    return table
