"""Telnet's commands (RFC 854) taken out of a chat client's byte stream, answered, never relayed.

``telnet`` sends commands in band, each starting with the byte IAC (0xFF): option negotiation,
and after Ctrl-C an interrupt (IAC IP) and a timing mark request (IAC DO TIMING-MARK), after
which it throws away everything the server sends until the mark is answered (RFC 860). A
``TelnetParser`` is fed what one ``recv`` returned and hands back the text between the commands
and the commands that matter to the chat; the answers wait in ``replies`` for the caller to send.
No I/O: the tests feed it bytes.

Rules it keeps:
- No command reaches the chat: IAC IAC is a literal 0xFF; IAC WILL/WONT/DO/DONT and the option
  byte, IAC SB ... IAC SE (a subnegotiation), and every two-byte command are taken out, also
  when a read cuts one in two. Valid UTF-8 has no 0xFF, so no text from a chat client is lost.
- Every option is refused, so the connection stays plain NVT text: DO x is answered WONT x,
  WILL x is answered DONT x. DO TIMING-MARK is answered WILL TIMING-MARK, which ends telnet's
  flush. WONT and DONT are never answered (they confirm a state already in force), so two
  peers cannot loop.
- IP (interrupt) and EL (erase line) are handed back: the chat drops the unfinished line. Every
  other command (NOP, DM, BRK, AO, AYT, EC, GA) means nothing here and is dropped.
- Bounded: nothing is kept across reads but the parser's state, one verb byte and a count; a
  subnegotiation's content is skipped as it comes, never stored.
- A subnegotiation without its IAC SE cannot swallow what follows: it ends at a newline (which
  stays text) or after ``SUB_MAX`` bytes, whichever comes first. Every option is refused, so a
  real telnet sends none; IAC SB is mostly stray 0xFF 0xFA (``ÿú`` from a Latin-1 terminal).
- A read with no IAC, when no command is half-read, costs one byte search and no copy.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsmchat.chat.framing import LineFramer


class Byte(IntEnum):
    """Telnet command bytes (RFC 854) and the one option this parser knows (RFC 860)."""

    SE = 240  # end of subnegotiation
    NOP = 241
    DM = 242  # data mark (of a Synch)
    BRK = 243
    IP = 244  # interrupt process: telnet sends it for Ctrl-C
    AO = 245  # abort output
    AYT = 246  # are you there
    EC = 247  # erase character
    EL = 248  # erase line
    GA = 249  # go ahead
    SB = 250  # begin subnegotiation
    WILL = 251
    WONT = 252
    DO = 253
    DONT = 254
    IAC = 255  # interpret as command
    TIMING_MARK = 6  # option 6 (RFC 860)


IAC = b"\xff"
INTERRUPTS = frozenset({Byte.IP, Byte.EL})
"""Commands handed back to the caller: each drops the unfinished line."""

SUB_MAX = 64
"""Most bytes of a subnegotiation's content skipped before the rest is text again."""

_NEGOTIATION = frozenset({Byte.WILL, Byte.WONT, Byte.DO, Byte.DONT})

# Parser states: between commands, after IAC, after a verb (its option byte next), inside a
# subnegotiation, after IAC inside a subnegotiation.
_TEXT, _COMMAND, _OPTION, _SUB, _SUB_IAC = range(5)


class TelnetParser:
    __slots__ = ("state", "verb", "sub_left", "replies")

    def __init__(self) -> None:
        self.state = _TEXT
        self.verb = 0  # WILL, WONT, DO or DONT, while its option byte is awaited
        self.sub_left = 0  # bytes a subnegotiation may still skip
        self.replies = bytearray()  # answers not yet sent

    def idle(self, data: bytes) -> bool:
        """Whether ``data`` is text only: no command in it, and none half-read before it."""
        return self.state == _TEXT and IAC not in data

    def feed(self, data: bytes) -> list[bytes | Byte]:
        """The text of ``data`` (pieces, in order) and the interrupts among it."""
        out: list[bytes | Byte] = []
        state = self.state
        position = 0
        size = len(data)
        while position < size:
            if state == _TEXT:
                found = data.find(IAC, position)
                end = size if found < 0 else found
                if end > position:
                    out.append(data[position:end])
                if found < 0:
                    break
                state = _COMMAND
                position = found + 1
                continue
            if state == _SUB:
                state, position = self._skip(data, position)
                continue
            byte = data[position]
            position += 1
            if state == _COMMAND:
                state = _TEXT
                if byte == Byte.IAC:
                    out.append(IAC)
                elif byte in _NEGOTIATION:
                    self.verb = byte
                    state = _OPTION
                elif byte == Byte.SB:
                    state = _SUB
                    self.sub_left = SUB_MAX
                elif byte in INTERRUPTS:
                    out.append(Byte(byte))
            elif state == _OPTION:
                self._answer(self.verb, byte)
                state = _TEXT
            else:  # _SUB_IAC: IAC IAC is data of the subnegotiation; anything else ends it
                self.sub_left -= 1
                state = _SUB if byte == Byte.IAC and self.sub_left > 0 else _TEXT
                position -= byte == 0x0A  # a line's end, as in _SUB: it is text
        self.state = state
        return out

    def _skip(self, data: bytes, position: int) -> tuple[int, int]:
        """A subnegotiation's content from ``position``: the state after it, and where."""
        window = min(len(data), position + self.sub_left)
        found = data.find(IAC, position, window)
        end = window if found < 0 else found
        newline = data.find(b"\n", position, end)
        if newline >= 0:  # the end of a line ends it: the newline is text
            return _TEXT, newline
        self.sub_left -= end - position
        if found >= 0:
            self.sub_left -= 1
            return _SUB_IAC, found + 1
        return (_SUB if self.sub_left else _TEXT), end  # too long: the rest is text

    def _answer(self, verb: int, option: int) -> None:
        if verb == Byte.DO:
            reply = Byte.WILL if option == Byte.TIMING_MARK else Byte.WONT
        elif verb == Byte.WILL:
            reply = Byte.DONT
        else:
            return
        self.replies += bytes((Byte.IAC, reply, option))

    def take(self) -> bytes:
        """The answers to send, once; empty when there are none."""
        replies = bytes(self.replies)
        self.replies.clear()
        return replies


def lines_of(telnet: TelnetParser, framer: LineFramer, data: bytes) -> tuple[list[bytes], bytes]:
    """The lines a read that holds telnet commands completes, and the answers those commands
    wait for (an interrupt takes the unfinished line back)."""
    lines: list[bytes] = []
    for piece in telnet.feed(data):
        if isinstance(piece, bytes):
            lines += framer.feed(piece)
        else:
            framer.discard()
    return lines, telnet.take()
