"""Chat mode: lines with names, commands, and text that cannot harm a terminal.

The mode is a layer on the raw relay, not a second server: each client keeps its connection
machine and queue; what one ``recv`` returned goes through the client's ``LineFramer`` instead of
straight to everyone, and each complete line becomes a message (``<name> text``), a command, or
nothing (an empty line). Commands are a table of their own (``chat/commands.py``); text is
made safe by ``chat/text.py``'s ``clean``. The chat is an ``Extension`` of the hub, and what it
sends goes back through the hub: to everyone else (``broadcast``), to one client (``tell``), or
the client leaves (``quit``). No sockets here.

Rules it keeps:
- Only whole lines are forwarded, so lines from different senders never interleave, whatever
  the TCP segmentation. The messages one read completes are joined into bytes objects of at
  most ``entry_bytes`` (a single message is never split), one queue entry per recipient each;
  history and the counters still count lines.
- Flow control is asked between those entries (and after a command that announced): when the
  sender must wait, its remaining lines wait in ``Member.held``, the server pauses it, and they
  go on (``resumed``) before anything newer is read from it. Held lines are said at a shutdown
  and dropped by a forced close, like an unfinished line.
- Notices from the server start with ``*** ``, which no client can produce (an action is
  ``* name text`` and names have no ``*``), so nobody can fake a join, a leave or a rename.
- Everything sent ends with ``\\n``. Public lines (messages, ``/me``, joins, leaves, renames) go
  to the sender's room through ``say`` (its members' queues, the Redis bus after the room's
  head, its history: ``chat/rooms.py``); replies to one client (welcome, ``/who``, refusals,
  ``bye``) and private lines through ``tell`` only.
- Text from a client, or from the Redis channel, is sanitised before anyone sees it (``clean``).
- A payload from the Redis channel is framed like a read (lines past ``max_line`` cut, counted
  in ``lines_cut``) after its first line says where it goes (``chat/payload.py``: a room, a
  person, or the lobby), and its lines go out in entries of at most ``entry_bytes`` too; when flow
  control holds between them, the rest waits in ``relaying`` (the server pauses the subscriber)
  and goes on (``relay_on``) before any newer payload; at the stop (the ``stopping`` hook),
  what still waits goes first.
- Telnet's commands never reach anyone: each client's reads go through its ``TelnetParser``
  before its framer (answers go back to it alone, an interrupt drops its unfinished line).
- Names are unique by their ``skeleton`` (case and look-alike letters aside), as the
  ``Directory`` knows them (``chat/directory.py``: this instance's members, or more with
  presence); a refusal never changes anything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import TYPE_CHECKING

from fsmchat.chat import private as _private  # noqa: F401  (registers /msg)
from fsmchat.chat.commands import COMMANDS, CommandTable
from fsmchat.chat.directory import Directory, MakeDirectory
from fsmchat.chat.framing import LineFramer
from fsmchat.chat.payload import To, route
from fsmchat.chat.recent import Budget, Recent, delayed
from fsmchat.chat.resume import replay as replay_as_asked
from fsmchat.chat.rooms import Room, Rooms
from fsmchat.chat.telnet import TelnetParser, lines_of
from fsmchat.chat.text import clean, prepare, skeleton
from fsmchat.hub import Extension
from fsmchat.reasons import Reason

if TYPE_CHECKING:
    from fsmchat.connection import Connection as Client
    from fsmchat.hub import Hub

DEFAULT_MAX_LINE = 4 * 1024
MAX_LINE_RANGE = (16, 64 * 1024)

ENTRY_BYTES = 64 * 1024
"""Most bytes of one sender's messages joined into one queue entry (the server may ask for
less: an eighth of its output limit). A single message is never split."""


def _is_command(line: bytes) -> bool:
    return line[:1] == b"/" and line[:2] != b"//"


def _message(name: bytes, line: bytes) -> bytes | None:
    """``<name> text`` for a line that is not a command; None for an empty one."""
    if not line.strip():
        return None
    return b"<%s> %s\n" % (name, clean(line[1:] if line[:1] == b"/" else line))


@dataclass(slots=True, eq=False)
class Member:
    name: bytes
    client: Client
    room: Room
    framer: LineFramer
    telnet: TelnetParser
    held: list[bytes] = field(default_factory=list)  # whole lines waiting for flow control
    operator: bool = False  # may run the commands marked operator_only
    gag: Callable[[Client], bool] | None = None  # set by /mute: asked before each message it
    # says, True while it is muted (and the callable answers it): the message goes to nobody


class Chat(Extension):
    """Names, commands and framing for every client in the chat."""

    def __init__(self, hub: Hub, max_line: int = DEFAULT_MAX_LINE,
                 entry_bytes: int = ENTRY_BYTES, suffix: bytes = b"", *,
                 commands: CommandTable = COMMANDS, history: Budget | None = None,
                 zone: tzinfo = UTC, directory: MakeDirectory | None = None) -> None:
        self.hub = hub
        self.commands = commands  # what a line starting with / may run
        self.flow = hub.flow
        self.max_line = max_line
        self.entry_bytes = entry_bytes  # most bytes of messages joined into one queue entry
        prepare()
        self.members: dict[int, Member] = {}  # fd -> member
        self.rooms = Rooms(history)
        self.zone = zone  # of the times in replayed history
        self.directory = (directory(self.members, self.rooms) if directory is not None
                          else Directory(self.members, self.rooms, shared=bool(suffix)))
        self.reserved: Container[bytes] = ()  # skeletons of account names (--accounts): no
        # newcomer is given one
        self.entering: Callable[[Client, Room], None] | None = None  # told as a member comes
        # into a room, before its history (moderation: the room's topic)
        self.losing: Callable[[Member], None] | None = None  # told as a member loses its
        # name to another instance, before it is renamed (accounts: the login goes with it)
        self.next_number = 1  # for the next user<N>
        self.suffix = suffix  # after user<N>: with --redis, "-" and 4 digits of the instance id
        self.lines_cut = 0  # lines longer than max_line, of members gone (live ones: their framer)
        self.relay_framer = LineFramer(max_line)  # for payloads from the Redis channel
        self.relaying: deque[tuple[Room | Client, bytes, bytes, int | None]] = deque()  # relayed,
        # held back: (where it goes, the line, the id of its message, late: when it was said)
        self.closing = False  # the server is shutting down: leaves are news elsewhere only
        self.seeds: dict[Recent, list[tuple[bytes, int, list[bytes]]]] = {}  # the past a sync
        # brought, per room's history, oldest first: put in at the end of the turn

    # -- the hub's hooks --------------------------------------------------------------------

    def greet(self, client: Client) -> None:
        """A client entered the chat: name it and welcome it (history comes next, then
        ``joined``)."""
        asked = client.asked  # (a page coming back: its room, what it showed last)
        lobby = self.rooms.lobby
        room = self.rooms.enter(asked.room if asked is not None and asked.room
                                else lobby.name, client)
        member = Member(self._new_name(), client, room, LineFramer(self.max_line),
                        TelnetParser())
        self.members[client.fd] = member
        self.directory.claim(member)
        self.directory.moved(member, None, room)
        self.hub.tell(client, b"*** welcome, you are %s (/help lists the commands)\n"
                      % member.name)
        if room is not lobby:
            self.hub.tell(client, b"*** you are now in %s\n" % room.name)
        if self.entering is not None:
            self.entering(client, room)
        self._replay(client, room, asked.after if asked is not None else ())

    def joined(self, client: Client) -> None:
        member = self.members[client.fd]
        self.say(member.room, b"*** %s joined %s\n" % (member.name, member.room.name), client)

    def left(self, client: Client) -> None:
        """A client left the chat (EOF, /quit, an error, a timeout, the shutdown)."""
        member = self.members.pop(client.fd, None)
        if member is None:
            return
        if member.held and client.reason == Reason.SERVER_SHUTDOWN:  # whole lines, read before
            self.hub.counts.messages_in += len(member.held)
            for line in member.held:
                message = None if _is_command(line) else _message(member.name, line)
                if message and not (member.gag and member.gag(client)):
                    self._broadcast_or_publish(member.room, message, client)
        rest = member.framer.flush()
        if rest and client.reason == Reason.PEER_CLOSED:  # typed, then EOF without a newline
            self.hub.counts.messages_in += 1
            message = None if _is_command(rest) else _message(member.name, rest)
            if message and not (member.gag and member.gag(client)):
                self._broadcast_or_publish(member.room, message, client)
        self.lines_cut += member.framer.cuts
        self.directory.release(member.name)
        room = member.room
        self._broadcast_or_publish(room, b"*** %s left %s\n" % (member.name, room.name), client)
        self.rooms.leave(room, client)
        self.directory.moved(member, room, None)

    def stopping(self) -> None:
        """The server is shutting down: say so here; from now on, leaves go to other instances
        only (everyone here is leaving too). Relayed lines still held back go first."""
        self.relay_on(hold=False)
        self.hub.deliver(b"*** the server is shutting down\n")
        self.closing = True

    def end_of_turn(self) -> None:
        """End of a loop turn: lines that waited for flow control go on, senders' first; the
        past a sync brought goes into history."""
        if self.seeds:
            self._seed()
        flow = self.flow
        if flow.waiting:
            flow.go_on(self.resumed)
        if self.relaying and not flow.holding:
            self.relay_on()
            if not self.relaying:
                self.hub.relay_done()

    def _broadcast_or_publish(self, room: Room, data: bytes, client: Client) -> None:
        """What a leaver said last: to its room, or while the server closes (everyone here
        leaves too) to the other instances only."""
        if self.closing:
            self.hub.publish(data, room.tag)
        else:
            self.say(room, data, client)

    def say(self, room: Room, data: bytes, sender: Client | None = None,
            lines: Sequence[bytes] = ()) -> None:
        """A public line (or the ``lines`` that ``data`` joins) for ``room``: its members but
        ``sender``, the other instances, its history."""
        hub = self.hub
        msg_id = hub.delivering = hub.msg_id(hub.seq + 1)  # (the number broadcast gives it)
        hub.broadcast(data, sender, lines, room.readers, room.tag)
        if sender is not None and sender.asked is not None and sender.asked.ids:
            hub.tell(sender, b"")  # its own line's id alone: a page that reads ids showed it
        hub.delivering = b""
        recent = room.recent
        if recent is not None:
            recent.add(data, lines, msg_id)

    def received(self, client: Client, data: bytes) -> None:
        """What one recv returned: every line it completes, in order."""
        member = self.members[client.fd]
        framer = member.framer
        cuts = framer.cuts
        if member.telnet.idle(data):
            lines = framer.feed(data)
        else:
            lines = self._untelnet(client, member, data)
        for _ in range(framer.cuts - cuts):  # once per long line
            self.hub.log.warning("chat.line_cut", fd=client.fd, peer=client.peer,
                                  limit=self.max_line)
        if member.held:  # lines held back by flow control go first (not read meanwhile)
            lines[:0] = member.held
            member.held = []
        if lines:
            self._take(client, member, lines)

    def resumed(self, client: Client) -> None:
        """Flow control lets ``client`` go again: the lines it held back go on."""
        member = self.members.get(client.fd)
        if member is not None and member.held:
            lines, member.held = member.held, []
            self._take(client, member, lines)

    def relay_waits(self) -> bool:
        return bool(self.relaying)

    def unread(self, client: Client) -> int:
        """Bytes of the lines flow control holds back for ``client`` (a stop cut short counts
        them as never passed on)."""
        member = self.members.get(client.fd)
        return sum(map(len, member.held)) if member is not None else 0

    def _take(self, client: Client, member: Member, lines: list[bytes]) -> None:
        """Lines of one client, in order: messages, commands. Flow control is asked between
        queue entries, so what one read multiplies into (names, cleaning) cannot run past a
        recipient's limit: when the sender must wait, the rest of its lines wait with it."""
        hub = self.hub
        flow = self.flow
        said: list[bytes] = []  # messages not yet announced: one queue entry for a run of them
        size = 0
        for count, line in enumerate(lines, 1):
            if not _is_command(line):
                message = _message(member.name, line)
                if message and not (member.gag and member.gag(client)):
                    if said and size + len(message) > self.entry_bytes:
                        self._broadcast(said, client)
                        size = 0
                        if flow.holds(client):
                            self._hold(client, member, lines, count - 1)
                            return
                    said.append(message)
                    size += len(message)
                continue
            announced = bool(said)
            self._broadcast(said, client)
            size = 0
            if hub.in_chat(client):
                announced = self.commands.run(self, client, member, line) or announced
            # /quit; or what was announced closed it (a leave notice took it past its limit):
            # either way the rest is not read.
            if not hub.in_chat(client):
                hub.counts.messages_in += count
                return
            if announced and count < len(lines) and flow.holds(client):
                self._hold(client, member, lines, count)
                return
        hub.counts.messages_in += len(lines)
        self._broadcast(said, client)
        flow.pause_if_held(client)

    def _hold(self, client: Client, member: Member, lines: list[bytes], done: int) -> None:
        """Keep the lines not yet taken until flow control lets ``client`` go again."""
        self.hub.counts.messages_in += done
        member.held = lines[done:]
        self.flow.wait(client)

    def _untelnet(self, client: Client, member: Member, data: bytes) -> list[bytes]:
        """The lines of a read that holds telnet commands; their answers go to ``client``."""
        lines, replies = lines_of(member.telnet, member.framer, data)
        if replies:
            self.hub.tell(client, replies)
            if not self.hub.in_chat(client):  # the answers took it past its limit
                return []
        return lines

    def _broadcast(self, said: list[bytes], client: Client) -> None:
        if said:
            room = self.members[client.fd].room
            self.say(room, said[0] if len(said) == 1 else b"".join(said), client,
                     said if len(said) > 1 else ())
            said.clear()

    def relayed(self, payload: bytes, msg_id: bytes = b"", late: int | None = None) -> bool:
        """A payload from another instance (``msg_id``: its id; ``late``: when it was said, if
        it comes late): its lines, cleaned, for the local members of the room it names
        (``chat/payload.py``) and its history, or for the one it names; whether some of them
        wait for flow control. A late one is marked ``(delayed HH:MM)`` for its readers; its
        history keeps it as it was said, as every instance's does.

        Another chat instance sent clean lines already; something else on the channel may not
        have: it is framed like a read, and a missing last newline added. Lines for a room
        nobody here is in go to its history only; for a name nobody here has, nowhere."""
        to, name, body = route(payload)
        target: Room | Client | None
        if to is To.DEFAULT:
            target = self.rooms.lobby
        elif to is To.ROOM:
            target = self.rooms.find(name)
        else:
            member = self.directory.find(name)
            target = member.client if member is not None else None
        lines = self._relayed_lines(body)
        relaying = self.relaying
        if not lines:
            return bool(relaying)
        if target is None:
            if to is To.ROOM:
                recent = self.rooms.history(name)
                if recent is not None:
                    minute = late // 60_000 if late else None
                    for line in lines:
                        recent.add(clean(line) + b"\n", (), msg_id, minute)
            return bool(relaying)
        going = not relaying  # else the older ones go first, at the end of a turn
        relaying.extend((target, clean(line) + b"\n", msg_id, late) for line in lines)
        if going:
            self.relay_on()
        return bool(relaying)

    def _relayed_lines(self, body: bytes) -> list[bytes]:
        """A relayed payload's lines, framed like a read (a missing last newline added)."""
        framer = self.relay_framer
        cuts = framer.cuts
        lines = framer.feed(body)
        rest = framer.flush()
        if rest or body[-1:] == b"\r":  # (an unfinished empty line is no line)
            lines.append(rest)
        for _ in range(framer.cuts - cuts):
            self.hub.log.warning("chat.line_cut", fd=None, peer="redis", limit=self.max_line)
        return lines

    def seeded(self, payload: bytes, msg_id: bytes, said_ms: int) -> None:
        """A message of the shared history's past (a room's stream): for its room's history,
        as it was said then, before what the room heard since this process started (at the
        end of the turn: ``_seed``); nobody is told."""
        to, name, body = route(payload)
        if to is To.PERSON:
            return
        recent = self.rooms.history(name if to is To.ROOM else self.rooms.lobby.name)
        if recent is None:
            return
        lines = [clean(line) + b"\n" for line in self._relayed_lines(body)]
        if lines:
            self.seeds.setdefault(recent, []).append((msg_id, said_ms // 60000, lines))

    def rebuild(self, key: bytes, past: list[tuple[bytes, int, bytes]]) -> None:
        """Room ``key``'s history as its stream holds it, after a sync brought lines it had
        missed (which came after its own lines of the outage, where they were said): the
        stream's order, as every instance has it, then what the history holds that the
        stream does not yet (lines still on their way to Redis)."""
        recent = self.rooms.history(key)
        if recent is None:
            return
        entries = []
        for msg_id, said_ms, data in past:
            to, _, body = route(data)
            if to is not To.PERSON:
                lines = [clean(line) + b"\n" for line in self._relayed_lines(body)]
                if lines:
                    entries.append((msg_id, said_ms // 60_000, lines))
        kept = {msg_id for msg_id, _, _ in entries}
        newer = [(msg_id, minute, data.splitlines(keepends=True))
                 for msg_id, minute, data in recent.messages() if msg_id and msg_id not in kept]
        recent.clear()
        for msg_id, minute, lines in entries + newer:
            recent.add(b"".join(lines), lines if len(lines) > 1 else (), msg_id, minute)

    def _seed(self) -> None:
        """The past a sync brought goes before each room's newer lines."""
        seeds, self.seeds = self.seeds, {}
        for recent, past in seeds.items():
            newer = list(recent.messages()) if recent.lines else []
            if newer:
                recent.clear()
            for msg_id, minute, lines in past:
                recent.add(b"".join(lines), lines if len(lines) > 1 else (), msg_id, minute)
            for msg_id, minute, data in newer:
                lines = data.splitlines(keepends=True)
                recent.add(data, lines if len(lines) > 1 else (), msg_id, minute)

    def gap(self, where: bytes) -> None:
        """Messages of the room ``where`` (its key) were missed for good: its members here are
        told."""
        room = self.rooms.by_key.get(where)
        if room is not None and room.readers:
            self.hub.deliver(b"*** some messages said in %s while this server was cut off from "
                             b"the others were missed: the shared history no longer holds "
                             b"them\n" % room.name, None, (), room.readers)

    def relay_on(self, hold: bool = True) -> None:
        """Relayed lines go on, an entry of at most ``entry_bytes`` at a time (of one room's
        lines, or one person's), until none is left or (``hold``) flow control holds between
        entries."""
        relaying = self.relaying
        hub = self.hub
        flow = self.flow
        limit = self.entry_bytes
        while relaying:
            target, line, msg_id, late = relaying.popleft()
            said = [line]
            size = len(line)
            while (relaying and relaying[0][0] is target and relaying[0][2] == msg_id
                   and size + len(relaying[0][1]) <= limit):
                line = relaying.popleft()[1]
                said.append(line)
                size += len(line)
            data = b"".join(said) if len(said) > 1 else line
            shown = data if late is None else delayed(data, late or None, self.zone)
            if isinstance(target, Room):
                hub.delivering = msg_id
                hub.deliver(shown, None, said if len(said) > 1 else (), target.readers)
                hub.delivering = b""
                if target.recent is not None:
                    target.recent.add(data, said if len(said) > 1 else (), msg_id,
                                      late // 60_000 if late else None)
            else:
                hub.tell(target, shown)
            if hold and relaying and flow.holding:
                return

    def history_kept(self) -> int:
        """Lines of history kept, in every room."""
        budget = self.rooms.budget
        return budget.kept if budget is not None else 0

    def cuts(self) -> int:
        return self.lines_cut + self.relay_framer.cuts + sum(
            m.framer.cuts for m in self.members.values())

    # -- names and rooms ----------------------------------------------------------------------

    def rename(self, client: Client, member: Member, name: bytes) -> None:
        """``member`` is ``name`` from now on (a name ``/nick`` found free), and its room is
        told."""
        hub = self.hub
        old = member.name
        member.name = name
        self.directory.renamed(member, old)
        hub.log.info("chat.nick", fd=client.fd, old=old.decode(), new=name.decode())
        hub.tell(client, b"*** you are now %s\n" % name)
        self.say(member.room, b"*** %s is now %s\n" % (old, name), client)

    def nick(self, client: Client, member: Member, name: bytes) -> bool:
        """``/nick NAME`` with a name nobody here has: renamed once the directory grants it
        (with other instances, once they were asked; meanwhile ``member`` keeps its name).
        Whether it announced something now."""
        asked = self.directory.asking(member)
        if asked is not None:
            self.hub.tell(client, b"*** nick: still asking the other servers about %s\n" % asked)
            return False
        announced = False

        def answered(holder: bytes | None) -> None:
            nonlocal announced
            if self.members.get(client.fd) is not member:
                return  # gone meanwhile
            if holder is None:
                self.rename(client, member, name)
                announced = True
            elif holder.lower() == name.lower():
                self.hub.tell(client, b"*** nick: %s was just taken on another server\n" % name)
            else:
                self.hub.tell(client, b"*** nick: %s looks too much like %s, who was just "
                                      b"named on another server\n" % (name, holder))

        self.directory.ask(member, name, answered)
        return announced

    def lost_name(self, member: Member, holder: bytes) -> None:
        """Another instance had ``member``'s name first (both gave it while Redis was away):
        ``member`` is told, and given a new one."""
        client = member.client
        self.hub.tell(client, b"*** %s was taken earlier on another server\n" % member.name)
        if self.losing is not None:
            self.losing(member)
        self.rename(client, member, self._new_name())

    def move(self, client: Client, member: Member, name: bytes) -> bool:
        """``member`` goes to room ``name`` (a valid room name): its old room is told, it is
        given the new one's history, then the new one is told. Whether it announced."""
        old = member.room
        if self.rooms.find(name) is old:
            self.hub.tell(client, b"*** you are in %s already\n" % old.name)
            return False
        self.say(old, b"*** %s left %s\n" % (member.name, old.name), client)
        self.rooms.leave(old, client)
        room = member.room = self.rooms.enter(name, client)
        self.directory.moved(member, old, room)
        self.hub.tell(client, b"*** you are now in %s\n" % room.name)
        if self.entering is not None:
            self.entering(client, room)
        self._replay(client, room)
        if self.hub.in_chat(client):  # (not if what it was told took it past its limit)
            self.say(room, b"*** %s joined %s\n" % (member.name, room.name), client)
        return True

    def _replay(self, client: Client, room: Room, after: Sequence[bytes] = ()) -> None:
        """``room``'s recent lines, framed and with their times, for a newcomer to it; for a
        WebSocket client that asked (``chat/resume.py``), each after its id, or only what it
        missed after the messages ``after``."""
        if client.asked is not None:
            replay_as_asked(self.hub, client, room.recent, self.zone, after)
        elif room.recent is not None and room.recent.lines and self.hub.in_chat(client):
            self.hub.replay(client, room.recent.framed(self.zone))

    def _new_name(self) -> bytes:
        while True:
            name = b"user%d%s" % (self.next_number, self.suffix)
            self.next_number += 1
            if self.directory.holder(name) is None and skeleton(name) not in self.reserved:
                return name
