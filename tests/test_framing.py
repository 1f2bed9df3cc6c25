"""In-process tests of chat mode's pieces that need no socket: framing, cleaning, history."""

from __future__ import annotations

import re
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from fsmchat.chat.framing import LineFramer
from fsmchat.chat.text import MARKS_MAX, PLANES, clean
from fsmchat.history import History

CONTROL = re.compile(r"[\x00-\x1f\x7f\x80-\x9f]")
BLANKS = re.compile(r"\s{2,}|[^\S ]")  # (\s: the blanks, separators included)


def harmful(text: str) -> list[str]:
    """What the README's rules say must not pass unchanged in ``text``."""
    found = [f"control {m.group()!r}" for m in CONTROL.finditer(text)]
    found += [f"blanks {m.group()!r}" for m in BLANKS.finditer(text)]
    run = 0
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        run = run + 1 if category in ("Mn", "Me") else 0
        if run > MARKS_MAX:
            found.append(f"mark {index}")
        if category in ("Cf", "Zl", "Zp") and not (
                char == "\u200d" and 0 < index < len(text) - 1
                and unicodedata.category(text[index + 1]) in ("So", "Sk")
                and (unicodedata.category(text[index - 1]) in ("So", "Sk")
                     or text[index - 1] == "\ufe0f")):
            found.append(f"invisible U+{ord(char):04X}")
        if char in "\u115f\u1160\u3164\uffa0\u2800":
            found.append(f"filler U+{ord(char):04X}")
    return found


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes]:
    lines: list[bytes] = []
    for chunk in chunks:
        lines.extend(framer.feed(chunk))
    return lines


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
       st.lists(st.integers(min_value=0, max_value=600), max_size=20),
       st.booleans())
def test_lines_come_out_whole_however_the_stream_is_cut(
        lines: list[bytes], cuts: list[int], crlf: bool) -> None:
    end = b"\r\n" if crlf else b"\n"
    stream = b"".join(line + end for line in lines)
    framer = LineFramer(64)
    got = feed_all(framer, split_at(stream, cuts))
    expected = [line[:-1] if not crlf and line.endswith(b"\r") else line for line in lines]
    assert got == expected
    assert framer.flush() == b""


@given(st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b"x")),
       st.integers(min_value=16, max_value=64),
       st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_a_long_line_is_cut_into_bounded_pieces_and_nothing_is_lost(
        line: bytes, limit: int, cuts: list[int]) -> None:
    line = line.rstrip(b"\r") or b"x"
    framer = LineFramer(limit)
    pieces = feed_all(framer, split_at(line + b"\n", cuts))
    assert b"".join(pieces) == line
    assert all(0 < len(piece) <= limit for piece in pieces)
    assert framer.cuts == (1 if len(line) > limit else 0)
    assert len(framer.rest) == 0


def test_a_cut_keeps_utf8_characters_whole() -> None:
    text = "é日本🙂" * 20
    framer = LineFramer(16)
    pieces = framer.feed(text.encode() + b"\n")
    assert "".join(piece.decode() for piece in pieces) == text  # each piece decodes alone
    assert all(len(piece) <= 16 for piece in pieces)


def test_a_crlf_split_across_reads_after_a_full_line_is_no_cut() -> None:
    framer = LineFramer(16)
    assert framer.feed(b"x" * 16 + b"\r") == []
    assert framer.feed(b"\n") == [b"x" * 16]
    assert framer.cuts == 0


def test_a_line_a_byte_at_a_time_arrives_whole() -> None:
    framer = LineFramer(64 * 1024)
    line = b"y" * (64 * 1024)
    assert all(framer.feed(line[i:i + 1]) == [] for i in range(len(line)))
    assert framer.feed(b"\n") == [line]


def test_what_is_left_at_eof_is_the_unfinished_line() -> None:
    framer = LineFramer(64)
    assert framer.feed(b"one\ntw") == [b"one"]
    assert framer.flush() == b"tw"
    assert framer.flush() == b""


@given(st.text(max_size=60))
def test_clean_text_is_harmless_and_harmless_text_survives(text: str) -> None:
    cleaned = clean(text.encode()).decode()  # always valid UTF-8
    assert harmful(cleaned) == []
    if not harmful(text):
        assert cleaned == text


@given(st.binary(max_size=60))
def test_clean_bytes_are_valid_utf8_without_controls(data: bytes) -> None:
    cleaned = clean(data).decode("utf-8")
    assert harmful(cleaned) == []


def test_clean_shows_controls_in_caret_notation() -> None:
    assert clean(b"\x1b[31mred\x1b[0m") == b"^[[31mred^[[0m"
    assert clean(b"a\rb\x08c\x07\x7f\x00") == b"a^Mb^Hc^G^?^@"
    assert clean(b"tab\tis a space") == b"tab is a space"
    assert clean("\u009b2J".encode()) == "\ufffd2J".encode()
    assert clean(b"bad \xff\xfe") == "bad \ufffd\ufffd".encode()
    plain = b"nothing to do"
    assert clean(plain) is plain


def test_clean_collapses_blanks_and_shows_what_is_invisible() -> None:
    padded = b"hi" + b" " * 200 + b"<bob> please send me your password"
    assert clean(padded) == b"hi <bob> please send me your password"
    assert clean("a\u3000\u00a0\t b\u3164c".encode()) == b"a b c"
    assert clean("evil\u202eexe.txt".encode()) == b"evil<U+202E>exe.txt"
    assert clean("zero\u200bwidth".encode()) == b"zero<U+200B>width"
    assert clean("one\u2028two\u2029".encode()) == b"one<U+2028>two<U+2029>"
    assert clean("tag\U000e0041\U000e007f".encode()) == b"tag<U+E0041><U+E007F>"
    zalgo = "z" + "\u0301\u0316\u0489" * 1000
    assert clean(zalgo.encode()) == zalgo[:1 + MARKS_MAX].encode()
    kept = "caf\u00e9 cafe\u0301 \U0001f469\u200d\U0001f4bb \u00db \u65e5\u672c"
    assert clean(kept.encode()) == kept.encode()  # Û is C3 9B: one character, no CSI


def test_the_unicode_rules_scan_every_plane_that_matters() -> None:
    for code in range(0x110000):
        if unicodedata.category(chr(code)) in ("Cf", "Zl", "Zp", "Mn", "Me", "Zs"):
            assert code >> 16 in PLANES, f"U+{code:04X}"


def test_history_keeps_the_last_n_within_the_byte_bound() -> None:
    history = History(3, 10)
    for message in (b"aa", b"bb", b"cc", b"dd"):
        history.add(message)
    assert list(history) == [b"bb", b"cc", b"dd"]
    history.add(b"eeeeeeee")  # 8 bytes: only dd and it fit in 10
    assert list(history) == [b"dd", b"eeeeeeee"]
    assert history.nbytes == 10
    history.add(b"x" * 11)  # larger than the bound: not kept, evicts nothing
    assert list(history) == [b"dd", b"eeeeeeee"]


@given(st.lists(st.binary(min_size=0, max_size=20), max_size=40),
       st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=60))
def test_history_is_always_the_newest_suffix_that_fits(
        messages: list[bytes], limit: int, max_bytes: int) -> None:
    history = History(limit, max_bytes)
    for message in messages:
        history.add(message)
    kept = list(history)
    assert len(kept) <= limit and sum(map(len, kept)) <= max_bytes == history.max_bytes
    assert history.nbytes == sum(map(len, kept))
    fitting = [m for m in messages if len(m) <= max_bytes]
    assert kept == fitting[len(fitting) - len(kept):]
    if len(kept) < min(limit, len(fitting)):  # one more would not have fitted
        assert history.nbytes + len(fitting[-len(kept) - 1]) > max_bytes
