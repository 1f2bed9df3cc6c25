"""Text from people made safe to show, and names: what a terminal may be shown, what a name is.

``clean`` makes any bytes harmless to a terminal (README's rules, under Chat mode); the usual
line, plain ASCII or text with nothing to change, comes back as the same object. ``skeleton``
is what a name looks like, so two names that pass for each other are not both given out.
No state: the Unicode tables are built once, on first use (``_unicode_rules``).
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

NAME_MAX = 16
_NAME = re.compile(rb"[A-Za-z0-9_-]{1,%d}" % NAME_MAX)


def is_name(name: bytes) -> bool:
    """Whether ``name`` may be a name: 1 to ``NAME_MAX`` ASCII letters, digits, ``-`` or ``_``
    (no ``*``, so nobody can pass for a notice or an action)."""
    return _NAME.fullmatch(name) is not None


ROOM_MAX = 32
"""Most characters in a room name."""


def room_problem(name: bytes) -> bytes | None:
    """What is wrong with ``name`` as a room name (a ``*** `` answer's text), or None.

    A room name is one word of 1 to ``ROOM_MAX`` characters, any letters, digits or punctuation
    (``math``, ``équipe-2``): no blanks, no control or invisible characters, valid UTF-8, so it
    shows as it is everywhere and fits on the bus's first line."""
    if not name:
        return b"a room needs a name"
    if _UNSAFE_UTF8.search(name):
        return b'"%s" has control characters: a room name has none' % clean(name)
    try:
        length = len(name.decode())
    except UnicodeDecodeError:
        return b'"%s" is not UTF-8 text' % clean(name)
    if length > ROOM_MAX:
        return b"a room name has at most %d characters, not %d" % (ROOM_MAX, length)
    if b" " in name or clean(name) != name or name[:1] in (b"#", b"@"):
        return (b'"%s" is not a room name: one word of letters, digits or punctuation, '
                b'without # or @ in front' % clean(name))
    return None

# C0 controls and DEL in caret notation (as ``cat -v`` shows them), but TAB, a blank like any
# other; C1 controls, which some terminals also obey (U+009B is CSI), as U+FFFD.
_SAFE = {code: f"^{chr(code + 64)}" for code in range(0x20)}
_SAFE[0x09] = " "
_SAFE[0x7F] = "^?"
_SAFE.update({code: "\ufffd" for code in range(0x80, 0xA0)})
_UNSAFE_ASCII = re.compile(rb"[\x00-\x1f\x7f]")
_SPACES = re.compile(" {2,}")

MARKS_MAX = 4
"""Combining marks kept on one character: enough for the stacks of real scripts, too few for a
wall of marks that covers the lines above and below."""

PLANES = (0, 1, 14)
"""The Unicode planes that hold every format character, combining mark and space (a test checks
it): ``_unicode_rules`` scans only these."""

_FILLERS = "\u115f\u1160\u3164\uffa0\u2800"
"""Letters and symbols that show as blank (Hangul fillers, the blank Braille pattern)."""

_ZWJ = "\u200d"
_EMOJI = frozenset({"So", "Sk"})  # a ZWJ between such characters joins an emoji: it stays


_UNSAFE_UTF8 = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")  # C0, DEL, C1 (U+0080-U+009F)


@cache
def _unicode_rules() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str],
                              re.Pattern[str]]:
    """Patterns for text beyond ASCII, from ``unicodedata``, built once (some 50 ms): format
    characters and line or paragraph separators; combining marks past ``MARKS_MAX``; blanks;
    and a quick check, a superset of what the three would change but two spaces (``clean``
    looks for those): one class, exact in the BMP, whose other planes are one range each, so a
    character it does not hold costs one bitmap lookup, not a scan of hundreds of ranges."""
    invisible: list[int] = []
    marks: list[int] = []
    blanks: list[int] = [ord(char) for char in _FILLERS]
    for plane in PLANES:
        for code in range(plane << 16, (plane + 1) << 16):
            category = unicodedata.category(chr(code))
            if category in ("Cf", "Zl", "Zp"):
                invisible.append(code)
            elif category in ("Mn", "Me"):
                marks.append(code)
            elif category == "Zs":
                blanks.append(code)
    mark = _char_class(marks)
    suspect = [code for code in invisible + marks + blanks if code != 0x20]
    for plane in PLANES[1:]:
        codes = [code for code in suspect if code >> 16 == plane]
        suspect += range(min(codes), max(codes))
    return (re.compile(_char_class(invisible)),
            re.compile(f"({mark}{{{MARKS_MAX}}}){mark}+"),
            re.compile(f"{_char_class(blanks)}{{2,}}|{_char_class(blanks, but=' ')}"),
            re.compile(_char_class(suspect)))


def prepare() -> None:
    """Build the Unicode tables now (some 50 ms), not in the middle of the chat."""
    _unicode_rules()


def _char_class(codes: list[int], but: str = "") -> str:
    """A regular expression character class of ``codes`` (sorted), as ranges."""
    ranges: list[list[int]] = []
    for code in sorted(set(codes) - {ord(char) for char in but}):
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "[" + "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}"
                         for a, b in ranges) + "]"


def _shown(match: re.Match[str]) -> str:
    """An invisible character made visible, as ``less`` shows it: ``<U+202E>``."""
    char = match.group()
    if char == _ZWJ:
        text, start, end = match.string, match.start(), match.end()
        if (start and end < len(text) and unicodedata.category(text[end]) in _EMOJI
                and (unicodedata.category(text[start - 1]) in _EMOJI
                     or text[start - 1] == "\ufe0f")):
            return char
    return f"<U+{ord(char):04X}>"


def clean(text: bytes) -> bytes:
    """``text`` made harmless to a terminal (the rules are README's, under Chat mode): control
    characters in caret notation (C1 ones as U+FFFD), invalid UTF-8 as U+FFFD, format
    characters and line separators shown as ``<U+XXXX>``, at most ``MARKS_MAX`` combining marks
    on a character, and each run of blanks one space. Anything else comes back unchanged."""
    if text.isascii():
        if _UNSAFE_ASCII.search(text) is None and b"  " not in text:
            return text  # the usual case: nothing to do, no copy
    elif _UNSAFE_UTF8.search(text) is None and b"  " not in text:
        try:
            fine = _unicode_rules()[3].search(text.decode()) is None  # (invalid: no)
        except UnicodeDecodeError:
            fine = False
        if fine:
            return text  # most text beyond ASCII: one search finds nothing to do
    shown = text.decode("utf-8", "replace").translate(_SAFE)
    if shown.isascii():
        return _SPACES.sub(" ", shown).encode()
    invisible, marks, blanks, _ = _unicode_rules()
    shown = marks.sub(r"\1", invisible.sub(_shown, shown))
    return blanks.sub(" ", shown).encode()


_LOOKALIKE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_LOOKALIKE = _LOOKALIKE.translate(bytes.maketrans(b"01iI", b"olll"))


def skeleton(name: bytes) -> bytes:
    """What ``name`` looks like: two names with one skeleton are not both given out.

    Names are ASCII letters, digits, ``-`` and ``_``. Unicode's confusables (UTS #39, the data of
    the confusable_homoglyphs package) hold only these pairs within that alphabet: 0 and O, 1, I
    and l, m and rn. To them come case and i (which l, I and 1 pass for in many fonts), so
    ``aIice`` and ``al1ce`` are ``alice``."""
    return name.translate(_LOOKALIKE).replace(b"m", b"rn")
