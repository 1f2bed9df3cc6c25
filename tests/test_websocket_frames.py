"""The frames the server makes for browsers, checked against wsproto's own parser and writer.

The server writes data frames itself (one header per message, shared by every recipient); a
browser reads them with its own WebSocket, so a wsproto client stands in for it here.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage
from wsproto.frame_protocol import FrameProtocol

from fsmchat.web.websocket import BINARY, TEXT, Frames, frame_header

SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def test_a_header_is_what_wsproto_would_write() -> None:
    writer = FrameProtocol(client=False, extensions=[])
    for size in SIZES:
        payload = b"x" * size
        assert frame_header(BINARY, size) + payload == bytes(writer.send_data(payload))
        assert frame_header(TEXT, size) + payload == bytes(writer.send_data(payload.decode()))


def test_one_frame_per_message_for_every_recipient() -> None:
    frames = Frames(BINARY)
    first, second = b"one message", b"another one"
    framed = frames.frame(first)
    assert frames.frame(first) is framed  # a second recipient: the same object, not made again
    assert frames.frame(second) is not framed
    assert frames.frame(second) == frame_header(BINARY, len(second)) + second


@given(st.lists(st.binary(max_size=70000), max_size=6))
def test_a_browser_reads_back_every_binary_message(messages: list[bytes]) -> None:
    frames = Frames(BINARY)
    browser = Connection(ConnectionType.CLIENT)
    browser.receive_data(b"".join(frames.frame(m) for m in messages))
    got: list[bytes] = []
    partial = b""
    for event in browser.events():
        assert isinstance(event, BytesMessage)
        partial += bytes(event.data)
        if event.message_finished:
            got.append(partial)
            partial = b""
    assert got == messages


@given(st.lists(st.text(max_size=300), max_size=6))
def test_a_browser_reads_back_every_line_of_text(lines: list[str]) -> None:
    frames = Frames(TEXT)
    browser = Connection(ConnectionType.CLIENT)
    encoded = [line.encode() for line in lines]
    browser.receive_data(b"".join(frames.frame(m) for m in encoded))
    got: list[str] = []
    partial = ""
    for event in browser.events():
        assert isinstance(event, TextMessage)
        partial += event.data
        if event.message_finished:
            got.append(partial)
            partial = ""
    assert got == lines
