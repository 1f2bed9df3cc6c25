"""Telnet's commands out of a byte stream, without sockets: what passes, what is answered.

The streams are built from commands as RFC 854 encodes them; the expected answers are the
rules of ``fsmchat.chat.telnet``'s docstring applied to the commands the test chose.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fsmchat.chat.telnet import SUB_MAX, Byte, TelnetParser

IAC, WILL, WONT, DO, DONT, SB, SE = 255, 251, 252, 253, 254, 250, 240
TM = 6
TWO_BYTE = [241, 242, 243, 244, 245, 246, 247, 248, 249]  # NOP .. GA
IP, EL = 244, 248

text = st.binary(max_size=30).map(lambda b: b.replace(b"\xff", b""))
# A command: its bytes on the wire, what it adds to the text, the answer it asks for, and
# whether it takes back the unfinished line.
Command = tuple[bytes, bytes, bytes, bool]
negotiation = st.tuples(st.sampled_from([WILL, WONT, DO, DONT]), st.integers(0, 255)).map(
    lambda vo: (bytes((IAC, *vo)), b"",
                bytes((IAC, WILL if vo[1] == TM else WONT, vo[1])) if vo[0] == DO
                else bytes((IAC, DONT, vo[1])) if vo[0] == WILL else b"", False))
two_byte = st.sampled_from(TWO_BYTE).map(
    lambda c: (bytes((IAC, c)), b"", b"", c in (IP, EL)))
literal = st.just((bytes((IAC, IAC)), b"\xff", b"", False))
subnegotiation = st.binary(max_size=20).map(  # (a newline would end it)
    lambda b: (bytes((IAC, SB)) + b.replace(b"\xff", b"\xff\xff").replace(b"\n", b"")
               + bytes((IAC, SE)),
               b"", b"", False))
command = st.one_of(negotiation, two_byte, literal, subnegotiation)


def feed_all(parser: TelnetParser, chunks: list[bytes]) -> list[bytes | Byte]:
    out: list[bytes | Byte] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(st.tuples(text, command)), text, st.lists(st.integers(0, 400), max_size=30))
def test_commands_are_taken_out_and_answered_however_the_stream_is_cut(
        parts: list[tuple[bytes, Command]], tail: bytes, cuts: list[int]) -> None:
    stream = b"".join(before + cmd[0] for before, cmd in parts) + tail
    # The text as the chat sees it: one piece per stretch between interrupts.
    expected = [b""]
    for before, (_, adds, _, interrupts) in parts:
        expected[-1] += before + adds
        if interrupts:
            expected.append(b"")
    expected[-1] += tail
    parser = TelnetParser()
    got = [b""]
    for piece in feed_all(parser, split_at(stream, cuts)):
        if isinstance(piece, bytes):
            got[-1] += piece
        else:
            assert piece in (Byte.IP, Byte.EL)
            got.append(b"")
    assert got == expected
    assert parser.take() == b"".join(cmd[2] for _, cmd in parts)
    assert parser.take() == b""


@given(st.binary().map(lambda b: b.replace(b"\xff", b"")))
def test_text_without_iac_passes_as_it_is(data: bytes) -> None:
    parser = TelnetParser()
    assert parser.idle(data)
    assert b"".join(p for p in parser.feed(data) if isinstance(p, bytes)) == data
    assert parser.take() == b""


def test_a_half_read_command_is_not_idle() -> None:
    parser = TelnetParser()
    assert parser.feed(b"abc\xff") == [b"abc"]
    assert not parser.idle(b"plain")
    assert parser.feed(bytes((DO,))) == []
    assert parser.feed(bytes((TM,)) + b"rest") == [b"rest"]
    assert parser.take() == bytes((IAC, WILL, TM))
    assert parser.idle(b"plain")


def text_of(parser: TelnetParser, chunks: list[bytes]) -> bytes:
    return b"".join(p for p in feed_all(parser, chunks) if isinstance(p, bytes))


@given(st.lists(st.integers(0, 200), max_size=8))
def test_an_unended_subnegotiation_swallows_at_most_the_rest_of_its_line(
        cuts: list[int]) -> None:
    typed = "caf\u00e9 \u00ff\u00fa oops\n".encode("latin-1")  # IAC SB from a Latin-1 user
    after = b"the next line\n" * 3
    assert text_of(TelnetParser(), split_at(typed + after, cuts)) == b"caf\xe9 \n" + after


@given(st.lists(st.integers(0, 300), max_size=8))
def test_an_unended_subnegotiation_skips_at_most_sub_max_bytes(cuts: list[int]) -> None:
    content = bytes(range(0x20, 0x7F)) * 2  # no newline, no IAC SE
    after = b"still typing\n"
    stream = bytes((IAC, SB)) + content + after
    assert text_of(TelnetParser(), split_at(stream, cuts)) == content[SUB_MAX:] + after
