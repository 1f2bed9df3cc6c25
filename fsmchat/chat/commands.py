"""Chat commands: one table, read by the dispatcher and by ``/help``, that any module adds to.

A line that starts with ``/`` (but ``//``) is a command: its first word, without the slash and
in any case (``/NICK`` is ``/nick``), is looked up in a ``CommandTable``; the rest of the line,
blanks at both ends stripped, is its argument. An unknown word gets one ``*** `` line and
changes nothing. ``/help`` lists the table, one line per command, in the order they were
registered, so a command that is registered is documented.

How to add a command (another module of the chat package)::

    from fsmchat.chat.commands import COMMANDS, Call

    @COMMANDS.command("topic", "/topic TEXT", "set the topic of your room", operator_only=True)
    def _topic(call: Call) -> bool:
        if not call.argument:
            call.usage()                      # "*** usage: /topic TEXT", to the caller alone
            return False
        call.answer(b"topic set")             # "*** topic set\\n", to the caller alone
        room = call.member.room
        call.chat.say(room, b"*** ...\\n", call.client)  # the rest of the room, other
        return True                           # instances, its history: it announced

and import that module once where the chat is built (``fsmchat/chat/mode.py`` imports the
modules that register commands, so the table is whole before the first client arrives).

A handler is given a ``Call``: ``call.chat`` (the ``Chat``: ``say(room, line, sender)`` for a
public line of a room, ``hub.tell(client, line)`` for one client, ``hub.quit(client)``,
``directory.find(name)`` for another member, ``members`` by fd, ``rooms``), ``call.client``
(the connection that typed it), ``call.member`` (that client's ``Member``: its ``name``,
``client``, ``room``, ``operator`` flag), ``call.argument`` (bytes, not yet cleaned: pass what
you show through ``clean``) and ``call.command`` (its ``Command``). It answers the caller with
``call.answer(text)`` (a ``*** `` line) or ``call.usage()``, and returns whether it announced
something to others (``say``, or a line told to another member): flow control is asked
before the sender's next line only then. A command marked ``operator_only`` never reaches
its handler for a member who is not an operator: the dispatcher answers for it.

Rules it keeps:
- Names are stored in lower case, without the slash; registering one twice is an error (two
  modules that both think they own ``/kick`` should fail at import, not at the first kick).
- Every answer to the caller starts with ``*** `` (no client can type that) and is one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fsmchat.chat.text import NAME_MAX, clean, is_name

if TYPE_CHECKING:
    from fsmchat.chat.mode import Chat, Member
    from fsmchat.connection import Connection as Client


@dataclass(slots=True)
class Call:
    """One command as typed: who typed it, and how to answer them."""

    chat: Chat
    client: Client
    member: Member
    command: Command
    argument: bytes  # the rest of the line, blanks at both ends stripped; not cleaned

    def answer(self, text: bytes) -> None:
        """One ``*** `` line for the caller alone (``text`` without the mark or newline)."""
        self.chat.hub.tell(self.client, b"*** %s\n" % text)

    def usage(self) -> None:
        """The command's usage, for the caller alone."""
        self.answer(b"usage: " + self.command.usage.encode())


Handler = Callable[[Call], bool]
"""Runs a command; returns whether it announced something to others."""


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # what follows the slash, lower case: "nick"
    usage: str  # how it is typed: "/nick NAME"
    help: str  # what it does, a few words: "take another name"
    handler: Handler
    operator_only: bool = False  # only members with ``operator`` set may run it


class CommandTable:
    """Commands by name, in the order they were registered."""

    __slots__ = ("_commands",)

    def __init__(self) -> None:
        self._commands: dict[bytes, Command] = {}

    def register(self, command: Command) -> Command:
        key = command.name.lower().encode()
        if key in self._commands:
            raise ValueError(f"/{command.name} is registered already")
        self._commands[key] = command
        return command

    def command(self, name: str, usage: str, help: str,
                operator_only: bool = False) -> Callable[[Handler], Handler]:
        """A decorator: register the function below as the handler of ``/name``."""
        def register(handler: Handler) -> Handler:
            self.register(Command(name, usage, help, handler, operator_only))
            return handler
        return register

    def lookup(self, word: bytes) -> Command | None:
        """The command ``word`` (without the slash) names, in any case."""
        return self._commands.get(word.lower())

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def run(self, chat: Chat, client: Client, member: Member, line: bytes) -> bool:
        """Run the command ``line`` holds; whether it announced something to others."""
        word, _, argument = line.partition(b" ")
        command = self.lookup(word[1:])
        if command is None:
            chat.hub.tell(client, b"*** unknown command %s (/help lists the commands; start a "
                                  b"line with // to send one that begins with /)\n"
                          % clean(word))
            return False
        call = Call(chat, client, member, command, argument.strip(b" "))
        # (other blanks are control characters: shown, not cut)
        if command.operator_only and not member.operator:
            call.answer(b"/%s is for operators only" % command.name.encode())
            return False
        return command.handler(call)

    def help(self, operator: bool) -> bytes:
        """``/help``: one line per command the asker may run."""
        width = max(len(command.usage) for command in self)
        return b"".join(b"*** %s  %s\n" % (command.usage.ljust(width).encode(),
                                           command.help.encode())
                        for command in self if operator or not command.operator_only)


COMMANDS = CommandTable()
"""The chat's commands: every module that adds one registers it here."""


@COMMANDS.command("help", "/help", "list the commands")
def _help(call: Call) -> bool:
    call.chat.hub.tell(call.client, call.chat.commands.help(call.member.operator))
    return False


@COMMANDS.command("nick", "/nick NAME", "take another name")
def _nick(call: Call) -> bool:
    chat, member, name = call.chat, call.member, call.argument
    if not name:
        call.usage()
    elif not is_name(name):
        call.answer(b'nick: "%s" is not a name: use 1 to %d letters, digits, - or _'
                    % (clean(name), NAME_MAX))
    elif name == member.name:
        call.answer(b"you are %s already" % name)
    elif (other := chat.directory.holder(name)) is not None and other != member.name:
        where = b"here" if chat.directory.find(other) is not None else b"on another server"
        if other.lower() == name.lower():
            call.answer(b"nick: %s is taken%s" % (
                name, b"" if where == b"here" else b" (on another server)"))
        else:
            call.answer(b"nick: %s looks too much like %s, who is %s" % (name, other, where))
    else:
        return chat.nick(call.client, member, name)
    return False


@COMMANDS.command("who", "/who", "list who is in your room")
def _who(call: Call) -> bool:
    room = call.member.room
    names = call.chat.directory.who(room)
    call.answer(b"%d in %s: %s" % (len(names), room.name, b", ".join(names)))
    return False


@COMMANDS.command("me", "/me ACTION", "tell your room what you do: * NAME ACTION")
def _me(call: Call) -> bool:
    if not call.argument:
        call.usage()
        return False
    call.chat.say(call.member.room, b"* %s %s\n" % (call.member.name, clean(call.argument)),
                  call.client)
    return True


@COMMANDS.command("quit", "/quit", "leave the chat")
def _quit(call: Call) -> bool:
    call.answer(b"bye")
    call.chat.hub.quit(call.client)
    return False
