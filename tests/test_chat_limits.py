"""Chat mode at its limits: many readers past --max-queue-bytes at once, reads that multiply.

Real server processes. What a queue inside the server holds is worked out from what was queued
to a client (what it read, and replies whose size a reading client measured) less what the
server's own ``data.sent`` events say it sent: never from the chat's formats.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest
from chat_harness import Chatter, join, join_many
from conftest import ServerProcess, StartServer, StreamReader

STUCK = 120
"""Readers that stop reading: well past the ~63 at which recursive leave notices broke."""
LIMIT = 1024 * 1024


def _sent(server: ServerProcess) -> Counter[int]:
    """Bytes sent per fd, by the log (no fd is reused while these tests look)."""
    sent: Counter[int] = Counter()
    for event in server.events("data.sent"):
        sent[event["fd"]] += event["bytes"]
    return sent


def _wait_received(server: ServerProcess, want: dict[int, int]) -> None:
    """Wait until the server logged receiving ``want[fd]`` bytes from each fd."""
    got: Counter[int] = Counter()
    missing = {fd for fd, size in want.items() if size}

    def feed(event: dict[str, object]) -> bool:
        if event.get("event") == "data.received":
            fd = event["fd"]
            assert isinstance(fd, int) and isinstance(event["bytes"], int)
            got[fd] += event["bytes"]
            if fd in missing and got[fd] >= want[fd]:
                missing.discard(fd)
        return not missing

    if missing:
        server.wait_for(feed, what="every request read")


def _nick_lines(need: int, overhead: int, longest: int) -> bytes:
    """Refused /nick lines whose replies (``overhead`` + the name each) add up to ``need``."""
    count = -(-need // (longest + overhead))
    names = need - count * overhead
    sizes = [names // count + (1 if i < names % count else 0) for i in range(count)]
    return b"".join(b"/nick " + b"!" * size + b"\n" for size in sizes)


class Stuck:
    """Readers that stopped reading, and what the server holds for each (``queued``)."""

    def __init__(self, server: ServerProcess, observer: Chatter, stuck: list[Chatter]) -> None:
        self.server = server
        self.observer = observer  # reads everything: measures replies, marks later steps
        self.stuck = stuck
        self.fds = [chatter.client.fd for chatter in stuck]
        self.owed = {chatter.client.fd: chatter.lines.received for chatter in stuck}
        self.requested: Counter[int] = Counter()
        observer.say("/who")
        self.who = len(observer.line())
        observer.say("/nick " + "!" * 100)
        self.overhead = len(observer.line()) - 100  # a refusal's size, less the name's

    def queued(self) -> dict[int, int]:
        """Each one's queue in the server, once two looks a loop turn apart agree."""
        before = None
        while True:
            self.observer.say("/who")  # a later turn of the loop: earlier sends are logged
            self.observer.line()
            sent = _sent(self.server)
            now = {fd: self.owed[fd] - sent[fd] for fd in self.fds}
            if now == before:
                return now
            before = now

    def ask(self, requests: dict[int, bytes], replies: dict[int, int]) -> None:
        """Each sends its requests, whose replies (to it alone) add up to ``replies[fd]``."""
        for chatter in self.stuck:
            fd = chatter.client.fd
            if requests.get(fd):
                chatter.send(requests[fd])
                self.requested[fd] += len(requests[fd])
                self.owed[fd] += replies[fd]
        _wait_received(self.server, dict(self.requested))

    def fill(self, room: int) -> None:
        """Their kernel buffers, then their queues past the high-water mark (each stalls and
        holds nobody back), then to ``room`` bytes under the limit, with replies to each alone."""
        step = LIMIT // 8 // self.who
        while True:
            queues = self.queued()
            short = [fd for fd, size in queues.items() if size < LIMIT * 5 // 8]
            if not short:
                break
            self.ask({fd: b"/who\n" * step for fd in short}, dict.fromkeys(short, step * self.who))
        assert max(queues.values()) < LIMIT - 4096, f"precondition: a queue too full: {queues}"
        top_up: dict[int, bytes] = {}
        needs: dict[int, int] = {}
        for fd, size in queues.items():
            need = needs[fd] = LIMIT - room - size
            whos = (need - self.overhead - 1) // self.who
            top_up[fd] = b"/who\n" * whos + _nick_lines(
                need - whos * self.who, self.overhead, 4000)
        self.ask(top_up, needs)


def test_stuck_readers_overflowing_at_once_are_each_closed_once_and_announced(
    start_server: StartServer,
) -> None:
    server = start_server("--mode", "chat", "--max-queue-bytes", str(LIMIT),
                          "--max-clients-per-addr", "0")  # every client comes from one address
    observer = join(server)
    stuck: list[Chatter] = []
    for _ in range(STUCK):
        stuck.append(join(server, observer, *stuck, rcvbuf=2048))
    sender = join(server, observer, *stuck)
    readers = Stuck(server, observer, stuck)
    # Just under the limit: room for no line, and for no leave notice.
    readers.fill(room=4)
    rooms = {fd: LIMIT - size for fd, size in readers.queued().items()}
    assert max(rooms.values()) < 1000, f"precondition: rooms {sorted(rooms.values())}"

    # One more line: no stuck reader has room for it, and each close announces a leave to the
    # rest, who have no room for that either.
    sender.say("x" * 1000)
    observer.line()
    names = sorted(f"*** {c.name} left lobby\n".encode() for c in stuck)
    for chatter in (observer, sender):
        assert sorted(chatter.line() for _ in stuck) == names
    for chatter in stuck:
        closed = server.wait_connection_event(chatter.client, "connection.closed")
        assert closed["reason"] == "queue_limit"
    warned = Counter(e["fd"] for e in server.events("connection.queue_limit"))
    assert warned == Counter(readers.fds), "one queue_limit warning per client"
    assert server.events("lifecycle.bug") == []

    newcomer = join(server, observer, sender)
    newcomer.say("still here?")
    observer.expect(f"<{newcomer.name}> still here?\n")
    sender.expect(f"<{newcomer.name}> still here?\n")
    assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    "options",
    [("--max-queue-bytes", "64K"), ("--max-queue-bytes", "512K"),
     # the read takes the sender past its rate: it is `limited` while its lines go out
     ("--max-queue-bytes", "64K", "--max-recv-rate", "32K")],
    ids=" ".join,
)
def test_a_read_of_short_lines_never_closes_readers_that_keep_up(
    start_server: StartServer, options: tuple[str, ...]
) -> None:
    server = start_server("--mode", "chat", *options)
    sender, *readers = join_many(server, 4)
    name = "n" * 16  # the longest name: the most each line grows by
    sender.say(f"/nick {name}")
    sender.expect(f"*** you are now {name}\n")
    for reader in readers:
        reader.expect(f"*** {sender.name} is now {name}\n")
        assert not reader.lines.buf
    # 64 KiB of one-character lines, sent at once: over 32,000 lines for one recv, and each
    # reaches the readers ten times as long.
    count = 32 * 1024
    expected = f"<{name}> x\n".encode() * count
    streams = [StreamReader(r.sock, limit=len(expected), keep=True) for r in readers]
    sender.send(b"x\n" * count)
    for stream in streams:
        assert stream.result().data == expected
    assert server.events("connection.queue_limit") == []
    readers[0].say("all here")
    sender.expect(f"<{readers[0].name}> all here\n")
