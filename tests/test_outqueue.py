"""The outgoing queue without sockets: what is handed to send and what is left after it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fsmchat.net.outqueue import IOV_MAX, JOIN_MAX, OutQueue


def queued_bytes(queue: OutQueue) -> bytes:
    return b"".join(bytes(buffer) for buffer in queue.chunk())


@given(
    messages=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=40),
    sends=st.lists(st.floats(min_value=0, max_value=1), max_size=40),
)
def test_partial_sends_keep_the_unsent_tail_in_order(
    messages: list[bytes], sends: list[float]
) -> None:
    queue = OutQueue()
    for message in messages:
        queue.push(message)
    expected = b"".join(messages)
    for share in sends:
        if not queue:
            break
        sent = int(queue.nbytes * share)
        queue.consume(sent)
        expected = expected[sent:]
        assert queue.nbytes == len(expected)
        assert queued_bytes(queue) == expected
        assert bool(queue) == bool(expected)


def test_a_broadcast_buffer_is_shared_not_copied() -> None:
    message = b"x" * 1000
    first, second = OutQueue(), OutQueue()
    first.push(message)
    second.push(message)
    assert first[0] is message and second[0] is message
    first.consume(10)
    head = first[0]
    assert isinstance(head, memoryview) and head.obj is message
    assert second[0] is message


def test_one_send_call_never_gets_more_buffers_than_the_system_takes() -> None:
    queue = OutQueue()
    for _ in range(IOV_MAX + 5):
        queue.push(b"ab")
    assert len(queue.chunk()) == IOV_MAX
    queue.consume(2 * IOV_MAX)
    assert len(queue.chunk()) == 5


def test_clear_forgets_everything() -> None:
    queue = OutQueue()
    queue.push(b"abc")
    queue.clear()
    assert not queue and queue.nbytes == 0


def test_joined_takes_whole_head_buffers_up_to_the_join_limit() -> None:
    queue = OutQueue()
    for size in (10, JOIN_MAX - 20, 30, 5):
        queue.push(b"x" * size)
    assert queue.joined() == b"x" * (JOIN_MAX - 10)
    queue.consume(JOIN_MAX - 10)
    assert queue.joined() == b"x" * 35


def test_a_buffer_larger_than_the_join_limit_is_taken_alone() -> None:
    queue = OutQueue()
    queue.push(b"a" * (JOIN_MAX + 1))
    queue.push(b"b")
    assert queue.joined() == b"a" * (JOIN_MAX + 1)
