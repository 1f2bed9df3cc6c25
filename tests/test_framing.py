"""In-process tests of chat mode's pieces that need no socket: framing, cleaning, history."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from fsmchat.chat import clean, clean_lines
from fsmchat.framing import LineFramer
from fsmchat.history import History

CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f]")


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
def test_clean_text_has_no_control_characters_and_valid_text_survives(text: str) -> None:
    cleaned = clean(text.encode()).decode()  # always valid UTF-8
    assert not CONTROL.search(cleaned)
    if not CONTROL.search(text):
        assert cleaned == text


@given(st.binary(max_size=60))
def test_clean_bytes_are_valid_utf8_without_controls(data: bytes) -> None:
    cleaned = clean(data).decode("utf-8")
    assert not CONTROL.search(cleaned)


def test_clean_shows_controls_in_caret_notation() -> None:
    assert clean(b"\x1b[31mred\x1b[0m") == b"^[[31mred^[[0m"
    assert clean(b"a\rb\x08c\x07\x7f\x00") == b"a^Mb^Hc^G^?^@"
    assert clean(b"tab\tstays") == b"tab\tstays"
    assert clean("\u009b2J".encode()) == "\ufffd2J".encode()
    assert clean(b"bad \xff\xfe") == "bad \ufffd\ufffd".encode()
    plain = b"nothing to do"
    assert clean(plain) is plain


def test_relayed_payloads_are_cleaned_line_by_line() -> None:
    assert clean_lines(b"<bob> hi\n") == [b"<bob> hi\n"]
    assert clean_lines(b"one\r\ntwo\x1b") == [b"one\n", b"two^[\n"]


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
