"""The join password (``--password SECRET_FILE``): asked of every newcomer before anything else.

A newcomer is held at the gate: told ``*** this chat needs a password: /pass PASSWORD``, it is no
reader (it takes no message, sees no history, nobody is told it came) until it gives the
password, as ``/pass PASSWORD`` or as a line of its own; ``/quit`` leaves, and any other command
is answered with the prompt again. Then the hub admits it: the welcome, the history and the
join notice follow as for anyone, and what it sent after the password goes on to the chat.

Rules it keeps:
- Held clients' reads are framed and telnet-parsed here, as the chat would (the same limits);
  nothing of theirs reaches anyone.
- Wrong passwords are slowed per address by the throttle, as account passwords are: during the
  wait a try is refused (``*** too many tries; wait N s``) without being compared.
- The gate costs the chat nothing once a client is in: only servers started with --password
  have one, and an admitted client's reads go straight to the chat after one dict lookup.
- At a stop, held clients are told the server is shutting down and closed (they have nothing
  to deliver); a password is never logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fsmchat.chat.accounts import JoinPassword
from fsmchat.chat.framing import LineFramer
from fsmchat.chat.guard import Throttle, seconds
from fsmchat.chat.login import peer_address
from fsmchat.chat.telnet import IAC, TelnetParser, lines_of
from fsmchat.hub import Extension, Gate
from fsmchat.reasons import Reason

if TYPE_CHECKING:
    from fsmchat.connection import Connection as Client
    from fsmchat.hub import Hub

PROMPT = b"*** this chat needs a password: /pass PASSWORD\n"


@dataclass(slots=True)
class _Held:
    client: Client
    framer: LineFramer
    telnet: TelnetParser


class JoinGate(Gate, Extension):
    """Newcomers wait here until they give the join password."""

    def __init__(self, hub: Hub, password: JoinPassword, max_line: int,
                 throttle: Throttle | None = None,
                 passed: Callable[[Client], None] | None = None) -> None:
        self.hub = hub
        self.password = password
        self.max_line = max_line
        self.throttle = throttle or Throttle()
        self.passed = passed  # told when a newcomer is held: its handshake, if any, is over
        self.held: dict[int, _Held] = {}  # fd -> a newcomer that has not given the password

    # -- the hub's gate --------------------------------------------------------------------------

    def holds(self, conn: Client) -> bool:
        self.held[conn.fd] = _Held(conn, LineFramer(self.max_line), TelnetParser())
        if self.passed is not None:
            self.passed(conn)
        self.hub.tell(conn, PROMPT)
        return True

    def gone(self, conn: Client) -> None:
        self.held.pop(conn.fd, None)

    def wrap(self, received: Callable[[Client, bytes], None]) -> Callable[[Client, bytes], None]:
        """What the hub hands reads to: held clients' to the gate, the others' to ``received``."""
        held = self.held

        def receive(client: Client, data: bytes) -> None:
            if client.fd in held:
                self._read(held[client.fd], data)
            else:
                received(client, data)

        return receive

    # -- the extension's hooks -------------------------------------------------------------------

    def stopping(self) -> None:
        for waiting in list(self.held.values()):
            self.hub.close_with(waiting.client, Reason.SERVER_SHUTDOWN,
                                b"*** the server is shutting down\n")

    # -- a held client's lines -------------------------------------------------------------------

    def _read(self, waiting: _Held, data: bytes) -> None:
        client = waiting.client
        lines, replies = lines_of(waiting.telnet, waiting.framer, data)
        if replies:
            self.hub.tell(client, replies)
        for count, line in enumerate(lines, 1):
            if not self.hub.in_chat(client):
                return
            if self._line(client, line):
                rest = b"".join(later + b"\n" for later in lines[count:]) + waiting.framer.flush()
                del self.held[client.fd]
                self.hub.admit(client)
                if rest and self.hub.in_chat(client):
                    self.hub.received(client, rest.replace(IAC, IAC + IAC))
                return

    def _line(self, client: Client, line: bytes) -> bool:
        """One line of a held client; whether it gave the password."""
        word, _, argument = line.partition(b" ")
        command = word.lower()
        if command == b"/quit":
            self.hub.tell(client, b"*** bye\n")
            self.hub.quit(client)
            return False
        if command == b"/pass":
            password = argument.strip(b" ")
        elif line[:1] == b"/":
            self.hub.tell(client, PROMPT)
            return False
        else:
            password = line.strip(b" ")
        if not password:
            return False
        key = ("join", peer_address(client.peer))
        wait = self.throttle.wait(key)
        if wait:
            self.hub.tell(client, b"*** too many tries; wait %d s\n" % seconds(wait))
            return False
        if not self.password.matches(password):
            wait = self.throttle.failed(key)
            self.hub.log.warning("chat.pass_failed", fd=client.fd, peer=client.peer,
                                 wait=round(wait, 3))
            self.hub.tell(client, b"*** wrong password (next try in %d s)\n" % seconds(wait))
            return False
        return True
