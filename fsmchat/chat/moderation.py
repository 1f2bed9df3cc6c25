"""Moderators: operators (accounts marked ``op``, once logged in) may ``/kick``, ``/mute`` and set
the ``/topic``; and the command table of a chat with accounts.

- ``/kick NAME [reason]``: NAME is told ``*** kicked by alice: reason`` and closed (reason
  ``kicked``) once what is queued for it is sent; everyone else sees ``*** bob was kicked by
  alice: reason`` (then, as for any leave, ``*** bob left``).
- ``/mute NAME [minutes]`` (10 by default, 0 lifts it): what NAME says (lines, ``/me``,
  ``/msg``) goes to nobody, and NAME is answered ``*** you are muted for N more minutes``;
  commands that say nothing still work. Everyone is told who muted whom. A mute belongs to the
  connection: it ends with it.
- ``/topic TEXT``: the chat's topic, shown to every newcomer after the welcome and to anyone
  by ``/topic`` alone; setting it is for operators.

Rules it keeps:
- Every action is an info event naming who did it (``by``) and to whom; a refusal (not an
  operator, no such name here, a bad number) is one ``*** `` line and changes nothing.
- Kicks and mutes reach members of this instance only (names are this instance's); the notices
  go to every instance, as any public line.
- A mute costs the chat nothing while nobody is muted: a member's ``gag`` is set only while it
  is muted, and cleared the first time it is asked after the mute ran out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from fsmchat import lifecycle
from fsmchat.chat.commands import COMMANDS, Call, Command, CommandTable, Handler
from fsmchat.chat.login import Login
from fsmchat.chat.text import clean, is_name, skeleton
from fsmchat.hub import Extension
from fsmchat.lifecycle import Trigger
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
    """Kicks, mutes and the topic of one chat."""

    def __init__(self, chat: Chat, clock: Callable[[], float] = time.monotonic) -> None:
        self.chat = chat
        self.hub = chat.hub
        self.clock = clock
        self.muted: dict[int, float] = {}  # fd -> when its mute ends (the clock's)
        self.topic = b""  # cleaned; b"": none
        self.topic_by = b""

    # -- the hub's hooks ----------------------------------------------------------------------

    def greet(self, client: Client) -> None:
        """A newcomer sees the topic right after the welcome."""
        if self.topic:
            self.hub.tell(client, self._topic_line())

    def left(self, client: Client) -> None:
        self.muted.pop(client.fd, None)

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

    def _target(self, call: Call, name: bytes, verb: bytes) -> tuple[Client, Member] | None:
        """The member of this instance that ``name`` names (any case, look-alikes), or None
        (the caller is answered)."""
        if not is_name(name):
            call.answer(b'%s: "%s" is not a name' % (verb, clean(name)))
            return None
        chat = self.chat
        held = chat.taken.get(skeleton(name))
        if held is not None:
            for fd, member in chat.members.items():
                client = self.hub.readers.get(fd)
                if member.name == held and client is not None:
                    if client is call.client:
                        call.answer(b"%s: that is you" % verb)
                        return None
                    return client, member
        call.answer(b"%s: nobody called %s here" % (verb, name))
        return None

    def kick(self, call: Call) -> bool:
        """``/kick NAME [reason]``."""
        name, _, why = call.argument.partition(b" ")
        if not name:
            call.usage()
            return False
        found = self._target(call, name, b"kick")
        if found is None:
            return False
        client, member = found
        why = clean(why.strip(b" "))
        by = call.member.name
        said = b": " + why if why else b""
        text = why.decode(errors="replace")  # (clean made it UTF-8 already)
        self.hub.log.info("chat.kick", fd=client.fd, peer=client.peer, name=member.name.decode(),
                          by=by.decode(), reason=text)
        self.hub.tell(client, b"*** kicked by %s%s\n" % (by, said))
        self.hub.broadcast(b"*** %s was kicked by %s%s\n" % (member.name, by, said), client)
        close_with_reason(client, Reason.KICKED)
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
        found = self._target(call, name, b"mute")
        if found is None:
            return False
        client, member = found
        by = call.member.name
        self.hub.log.info("chat.mute", fd=client.fd, peer=client.peer, name=member.name.decode(),
                          by=by.decode(), minutes=minutes)
        if not minutes:
            self._unmute(client.fd)
            self.hub.tell(client, b"*** %s lifted your mute\n" % by)
            self.hub.broadcast(b"*** %s lifted the mute of %s\n" % (by, member.name), client)
            return True
        self.muted[client.fd] = self.clock() + minutes * 60
        member.gag = self.gagged
        plural = b"" if minutes == 1 else b"s"
        self.hub.tell(client, b"*** you are muted by %s for %d minute%s\n" % (by, minutes, plural))
        self.hub.broadcast(b"*** %s was muted by %s for %d minute%s\n"
                           % (member.name, by, minutes, plural), client)
        return True

    def topic_command(self, call: Call) -> bool:
        """``/topic`` shows the topic; ``/topic TEXT`` (operators) sets it."""
        if not call.argument:
            if self.topic:
                self.hub.tell(call.client, self._topic_line())
            else:
                call.answer(b"no topic is set")
            return False
        if not call.member.operator:
            call.answer(b"topic: only operators set the topic")
            return False
        self.topic = clean(call.argument)
        self.topic_by = call.member.name
        self.hub.log.info("chat.topic", fd=call.client.fd, by=self.topic_by.decode(),
                          topic=self.topic.decode(errors="replace"))
        self.hub.tell(call.client, b"*** you set the topic: %s\n" % self.topic)
        self.hub.broadcast(b"*** %s set the topic: %s\n" % (self.topic_by, self.topic),
                           call.client)
        return True

    def _topic_line(self) -> bytes:
        return b"*** topic: %s (set by %s)\n" % (self.topic, self.topic_by)


def close_with_reason(client: Client, reason: str) -> None:
    """Close ``client`` once what is queued for it (its last line) is sent, for ``reason``:
    the path ``/quit`` takes, with another reason."""
    if lifecycle.allowed(client.state, Trigger.QUIT):
        client.reason = reason
        client.fire_safely(Trigger.QUIT)


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
