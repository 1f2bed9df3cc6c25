"""Lines out of a byte stream: what chat mode reads from each client.

A ``LineFramer`` is fed whatever one ``recv`` returned and hands back the lines it completed,
without their terminator (``\\n`` or ``\\r\\n``). The unfinished rest waits inside it for the next
feed, so how TCP cut the stream never shows. No I/O: the tests feed it bytes.

Rules it keeps:
- Memory is bounded: no line, and no unfinished rest, is ever longer than ``max_line`` bytes. A
  longer line is cut into pieces of at most ``max_line`` bytes, each handed back as a line of its
  own, so nothing is lost; ``cuts`` counts the lines that were cut.
- A cut never splits a UTF-8 character when it can help it: it backs off to the character's
  first byte (at most three bytes).
"""

from __future__ import annotations


class LineFramer:
    __slots__ = ("max_line", "rest", "cutting", "cuts")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.rest = bytearray()  # the unfinished line so far
        self.cutting = False  # the unfinished line was cut already (counted once)
        self.cuts = 0  # lines longer than max_line so far

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, oldest first, terminators removed.

        Only ``data`` is searched for a newline, and the unfinished rest grows in place: a line
        that arrives a byte per recv costs linear time, not quadratic."""
        rest = self.rest
        if b"\n" not in data:
            rest += data
            return self._cut_rest() if self._too_long(rest) else []
        if rest:  # a line that began in an earlier read (a read of whole lines copies nothing)
            rest += data
            data = bytes(rest)
            rest.clear()
        lines = data.split(b"\n")
        rest += lines.pop()
        max_line = self.max_line
        out: list[bytes] = []
        for whole in lines:
            line = whole[:-1] if whole[-1:] == b"\r" else whole
            if len(line) > max_line:
                out.extend(self._cut(line))
            else:
                out.append(line)
            self.cutting = False
        if self._too_long(rest):
            out.extend(self._cut_rest())
        return out

    def flush(self) -> bytes:
        """What is left of an unfinished line (at EOF); empty when there is none."""
        rest = bytes(self.rest)
        self.rest.clear()
        self.cutting = False
        return rest[:-1] if rest[-1:] == b"\r" else rest

    def discard(self) -> None:
        """Forget the unfinished line (telnet's interrupt: the user took it back)."""
        self.rest.clear()
        self.cutting = False

    def _too_long(self, rest: bytearray) -> bool:
        """Over max_line, not counting a final CR: its LF may be in the next read."""
        size = len(rest)
        return size > self.max_line and not (size == self.max_line + 1 and rest[-1] == 0x0D)

    def _cut_rest(self) -> list[bytes]:
        """The unfinished line's full pieces; the last, shorter one stays unfinished."""
        pieces = self._cut(bytes(self.rest))
        self.rest[:] = pieces.pop()
        return pieces

    def _cut(self, line: bytes) -> list[bytes]:
        """``line`` in pieces of at most max_line bytes; the last may be shorter."""
        if not self.cutting:
            self.cutting = True
            self.cuts += 1
        pieces: list[bytes] = []
        max_line = self.max_line
        start = 0  # (no copy of the rest per piece: a relayed payload may hold many)
        while len(line) - start > max_line:
            end = _boundary(line, start, start + max_line)
            pieces.append(line[start:end])
            start = end
        pieces.append(line[start:])
        return pieces


def _boundary(data: bytes, start: int, limit: int) -> int:
    """The largest cut at or below ``limit`` that does not split a UTF-8 character (and leaves
    a piece after ``start``)."""
    end = limit
    for _ in range(3):
        if end <= start + 1 or (data[end] & 0xC0) != 0x80:  # not a continuation byte: a start
            break
        end -= 1
    return end if (data[end] & 0xC0) != 0x80 else limit
