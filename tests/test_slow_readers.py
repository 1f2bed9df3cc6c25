"""Slow and stuck readers: the per-connection output limit, flow control and fair reading.

A reader that never reads must cost the server a bounded amount of memory and the chat at most
about a second; a reader that is merely slow for a moment must be waited for (the sender is
paused), not dropped; and one busy sender must not keep a short message from others waiting.
"""

from __future__ import annotations

import hashlib
import os
import threading

from conftest import (
    BackgroundReader,
    Event,
    MiB,
    StartServer,
    StreamReader,
    proc_status_kib,
    recv_exactly,
)

#: SO_RCVBUF for a client that never reads: the kernel then holds little for it, so the
#: server's queue for it fills quickly.
STUCK_RCVBUF = 1024


def test_stuck_reader_is_dropped_at_the_limit_and_the_others_get_everything(
    start_server: StartServer,
) -> None:
    # Fails without the output limit: the stuck reader's queue grows past 256 KiB and it is
    # never closed (no connection.queue_limit, no reason queue_limit). Fails without the stall
    # rule of flow control: the sender would stay paused behind the stuck reader for good and
    # sendall would time out.
    limit = 256 * 1024
    server = start_server("--max-queue-bytes", "256K")
    assert server.events("server.started")[0]["max_queue_bytes"] == limit
    sender = server.connect()
    fast = server.connect()
    stuck = server.connect(rcvbuf=STUCK_RCVBUF)

    payload = os.urandom(8 * MiB)
    reader = BackgroundReader(fast.sock, len(payload))
    sender.sock.settimeout(30)
    sender.sock.sendall(payload)
    data = reader.result()
    assert len(data) == len(payload)
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()

    over = server.wait_connection_event(stuck, "connection.queue_limit")
    assert over["peer"] == stuck.peer
    assert over["limit"] == limit
    # "queued" may be counted before or after the message that did not fit (at most 64 KiB).
    assert limit - 64 * 1024 < over["queued"] <= limit + 64 * 1024, over
    assert server.wait_closed(stuck)["reason"] == "queue_limit"

    # With one sender, the stuck queue can pass half the limit by one message at most before
    # the sender is paused; it can only reach the limit after it stopped holding the sender.
    names = [e["event"] for e in server.connection_events(stuck)]
    assert "connection.stalled" in names, names
    assert names.index("connection.stalled") < names.index("connection.queue_limit"), names
    stalled = server.connection_events(stuck, "connection.stalled")[0]
    assert stalled["peer"] == stuck.peer
    assert stalled["queued"] > limit // 2, stalled

    # The fast reader was never dropped, and the chat goes on for someone who comes later.
    assert not server.connection_events(fast, "connection.queue_limit")
    assert not server.connection_events(fast, "connection.closed")
    late = server.connect()
    late.sock.sendall(b"still chatting")
    assert recv_exactly(fast.sock, 14) == b"still chatting"
    assert recv_exactly(sender.sock, 14) == b"still chatting"


def test_200_mib_reach_a_bursty_reader_while_a_stuck_one_is_dropped(
    start_server: StartServer,
) -> None:
    # Fails without flow control: while the reader pauses (200 ms, twice) the server keeps
    # reading the sender at hundreds of MB/s, the reader's queue passes 4 MiB and it is dropped
    # (queue_limit, and it never gets all 200 MiB); no "paused" state either. Fails without the
    # output limit: the stuck client's queue holds up to 200 MiB (VmHWM >= 100 MiB) and it is
    # never closed with queue_limit. Fails without the stall rule: the sender stays paused
    # behind the stuck client and the transfer times out.
    server = start_server()  # debug level: the state events show the pauses
    sender = server.connect()
    reader_client = server.connect()
    stuck = server.connect(rcvbuf=STUCK_RCVBUF)

    blocks = 200
    total = blocks * MiB
    sent_hash = hashlib.sha256()
    got_hash = hashlib.sha256()
    reader = StreamReader(
        reader_client.sock,
        limit=total,
        on_chunk=got_hash.update,
        pauses=((50 * MiB, 0.2), (120 * MiB, 0.2)),
        timeout=20,
    )
    block = bytearray(os.urandom(MiB))
    sender.sock.settimeout(30)
    for i in range(blocks):
        block[:8] = i.to_bytes(8, "big")  # every block differs: a misplaced one changes the hash
        sent_hash.update(block)
        sender.sock.sendall(block)
    reader.result()
    assert reader.received == total
    assert got_hash.hexdigest() == sent_hash.hexdigest()

    assert server.wait_closed(stuck)["reason"] == "queue_limit"
    assert not server.connection_events(reader_client, "connection.queue_limit")
    assert not server.connection_events(reader_client, "connection.closed")

    states: list[Event] = server.connection_events(sender, "connection.state")
    paused = [e for e in states if e["to"] == "paused"]
    resumed = [e for e in states if e["from"] == "paused" and e["to"] == "reading"]
    assert paused, "the sender was never paused"
    assert all(e["trigger"] == "throttle" for e in paused), paused
    assert resumed, "the sender was never resumed"
    assert all(e["trigger"] == "resume" for e in resumed), resumed

    peak_kib = proc_status_kib(server.pid, "VmHWM")
    assert peak_kib < 100 * 1024, f"server peak RSS {peak_kib} KiB"


def test_a_flooding_sender_does_not_hold_back_a_short_message(start_server: StartServer) -> None:
    # Fails if the server read one sender until EAGAIN before serving others: the flood's bytes
    # keep arriving faster than the Python loop relays them, so B's marker would only be read
    # after (nearly) the whole flood and land near its end. The limit is 64 MiB so that the
    # reader's queue never reaches half of it: flow control never pauses A, and only fair
    # reading (one recv per readable client per turn) lets B's marker in early.
    server = start_server("--max-queue-bytes", "64M", "--log-level", "info")
    a = server.connect()
    b = server.connect()  # B receives the flood too and never reads it (30 MiB < half limit)
    reader_client = server.connect()

    flood_size = 30 * MiB
    flood = b"a" * flood_size
    marker = b"<marker from B>"
    reader = StreamReader(reader_client.sock, limit=flood_size + len(marker), keep=True)

    errors: list[Exception] = []

    def send_flood() -> None:
        try:
            a.sock.settimeout(30)
            a.sock.sendall(flood)
        except OSError as exc:
            errors.append(exc)

    flooder = threading.Thread(target=send_flood, daemon=True)
    flooder.start()
    reader.wait_received(1 * MiB)  # the flood is under way (far from its end)
    b.sock.sendall(marker)
    reader.result()
    flooder.join(30)
    assert not flooder.is_alive() and not errors, errors

    data = reader.data
    offset = data.find(marker)
    assert offset >= 0, "the marker never arrived"
    assert data[:offset] + data[offset + len(marker) :] == flood, "the flood arrived damaged"
    assert offset < flood_size // 2, (
        f"B's marker arrived after {offset} of the flood's {flood_size} bytes"
    )
