"""The clients of the bench: many non-blocking clients per process, one-way latency.

Every client is a non-blocking socket in one ``selectors`` loop per worker process (``procs``
workers, each with a share of the clients; one is the default and the right choice on a 2-core
machine, where the server under test needs the other core). A client reads everything that
arrives, all the time, and sends frames of ``harness.frames``' format, of a fixed size.

- *Paced* (a rate R): every client sends R frames a second, each with its own ``send``. The
  sends of all clients are spread evenly over time (round robin), so the offered load has no
  bursts; every client sends exactly ``round(R * duration)`` frames (at least one).
- *Burst*: every client keeps its socket full (batches of frames per ``send``) for the duration.

Receivers re-frame the byte stream, check the magic and trailer of every frame (a relay that
splits a frame and interleaves another sender's bytes into it shows up as ``garbled_bytes``; the
stream resynchronises on the next magic), count frames, echoes (a frame coming back to its own
sender) and, with ``verify``, the order of every (receiver, sender) pair: each frame's ``seq``
must be the previous one plus one. Latencies go into ``harness.stats``' histogram. Frames are
parsed in bulk with numpy, one batch per loop turn, and a read takes everything a socket holds
(up to 256 KiB), so the generator's cost per delivered frame falls as the load rises and it stays
out of the way of the server it measures.

``LoadGen`` drives the workers over pipes (connect, a barrier until everyone is in the chat,
one step, its ``StepResult``); ``Worker`` is meant to be subclassed for other sockets or
codecs (``harness.counting``, ``bench/chat.py``). ``bench/loadgen.py`` runs one step by hand.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.frames import (
    CHURN_STEP,
    HEADER,
    MAGIC,
    MAGIC_BYTES,
    MIN_SIZE,
    PROBE_STEP,
    TRAILER,
    TRAILER_BYTES,
    frame_dtype,
    frame_tail,
)
from harness.procfs import own_cpu
from harness.server import raise_nofile
from harness.stats import I64Array, buckets, histogram, percentile_ns

RECV_SIZE = 256 * 1024
ACCOUNT_FRAMES = 4096  # frames read are parsed in batches of about this many ...
ACCOUNT_NS = 5_000_000  # ... or after this long (their receive times are kept per read)
MAX_SENDS_PER_TURN = 2000
CONNECT_IN_FLIGHT = 8  # handshakes at once: a burst past a listen backlog strands clients (ncat)
CONNECT_RATE = 2000.0  # connections started per second (see connect_many)
MIN_TURN_NS = 200_000  # a turn starts at most this often: reads fill up a little, much less CPU
BURST_BYTES = 16 * 1024  # bytes per send in burst mode


def connect_many(addr: tuple[str, int], count: int, timeout: float, errors: dict[str, int],
                 *, in_flight: int = 8, rate: float = 2000.0) -> list[socket.socket | None]:
    """Open ``count`` non-blocking connections, at most ``in_flight`` handshakes at a time and
    ``rate`` new ones a second; None where one failed. Faster than the server accepts, the
    connections pile up in its listen backlog, and past the backlog the kernel drops them and
    the client retries after a second or more: the test would then measure TCP's retry timers
    (Twisted's backlog is 50, ncat's 10)."""
    socks: list[socket.socket | None] = [None] * count
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    started = 0
    waiting = 0

    def failed(why: str) -> None:
        errors[why] = errors.get(why, 0) + 1

    t0 = time.monotonic()
    try:
        for _ in range(count * 4 + int(timeout * 1000) + 1000):  # bounded, and by the deadline
            allowed = min(count, int((time.monotonic() - t0) * rate) + 1)
            while waiting < in_flight and started < allowed:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex(addr)
                if code in (0, errno.EINPROGRESS):
                    sel.register(sock, selectors.EVENT_WRITE, started)
                    socks[started] = sock
                    waiting += 1
                else:
                    sock.close()
                    failed(errno.errorcode.get(code, str(code)))
                started += 1
            if (not waiting and started >= count) or time.monotonic() > deadline:
                break
            for key, _ in sel.select(min(0.001 if started < count else 0.5,
                                         max(0.0, deadline - time.monotonic()))):
                sock = key.fileobj  # type: ignore[assignment]
                sel.unregister(sock)
                waiting -= 1
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sock.close()
                    socks[key.data] = None
                    failed(errno.errorcode.get(err, str(err)))
        for key in list(sel.get_map().values()):  # still waiting at the deadline
            key.fileobj.close()  # type: ignore[union-attr]
            socks[key.data] = None
            failed("timeout")
        if started < count:
            errors["timeout"] = errors.get("timeout", 0) + count - started
    finally:
        sel.close()
    return socks


# -- one worker process ------------------------------------------------------------------------


class Client:
    __slots__ = ("gid", "index", "pending", "rest", "sock", "writing")

    def __init__(self, sock: socket.socket, index: int, gid: int) -> None:
        self.sock = sock
        self.index = index  # in this worker
        self.gid = gid  # sender id, across workers
        self.rest = b""  # a partial frame at the end of the last read
        self.pending = b""  # bytes the socket did not take yet
        self.writing = False  # registered for EVENT_WRITE


class Worker:
    """A share of the clients, their loop, and the stats of the current step."""

    def __init__(self, control: Connection, wid: int, lifetime: float) -> None:
        self.control = control
        self.wid = wid
        self.deadline = time.monotonic() + lifetime
        self.sel = selectors.DefaultSelector()
        self.sel.register(control.fileno(), selectors.EVENT_READ, None)
        self.clients: list[Client] = []
        self.gids: I64Array = np.zeros(0, dtype=np.int64)
        self.rbuf = bytearray(RECV_SIZE)
        self.rview = memoryview(self.rbuf)
        self.by_fd: dict[int, Client] = {}
        self.total_clients = 0
        self.size = 64
        self.dtype = frame_dtype(self.size)
        self.tail = frame_tail(self.size)
        self.quit = False
        # the current step
        self.step = 0
        self.verify = False
        self.burst = False
        self.send_total = 0  # frames this worker sends in the step (paced)
        self.send_k = 0  # frames handed out so far
        self.send_t0 = 0  # first due time, ns
        self.send_interval = 0.0  # ns between frames of this worker
        self.send_end = 0  # burst: stop making frames at this time, ns
        self.burst_seq: list[int] = []
        self.probe_seen: dict[int, int] = {}
        # reads not parsed yet: bytes of whole frames, reader, receive time, frames
        self.acc_chunks: list[bytes] = []
        self.acc_owners: list[int] = []
        self.acc_times: list[int] = []
        self.acc_counts: list[int] = []
        self.acc_frames = 0
        self.last_turn_ns = 0
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.hist: I64Array = histogram()
        self.received = 0
        self.echo = 0
        self.order_gaps = 0  # seq jumped ahead: frames missing in between
        self.order_back = 0  # seq went back or repeated: reordered or duplicated
        self.stale = 0  # frames of another step
        self.garbled_bytes = 0
        self.disconnects = 0
        self.partial_sends = 0
        self.eagain = 0
        self.sent = 0
        self.lag_max_ns = 0
        self.lag_sum_ns = 0
        self.last_send_ns = 0
        self.max_latency_ns = 0
        self.turns = 0
        self.reads = 0
        self.cpu0 = own_cpu()
        self.wall0 = time.monotonic()
        self.last_seq: I64Array = np.full(max(1, len(self.clients) * self.total_clients), -1,
                                          dtype=np.int64) if self.verify else np.zeros(
                                              1, dtype=np.int64)

    # -- control -------------------------------------------------------------------------------

    def serve(self) -> None:
        try:
            while not self.quit and time.monotonic() < self.deadline:
                self._turn()
        finally:
            self._close_clients()
            self.sel.close()

    def _turn(self) -> None:
        timeout = self._timeout()
        now = time.monotonic_ns()
        rest = self.last_turn_ns + MIN_TURN_NS - now
        if rest > 0 and timeout > 0:  # let data pile up a little: fewer, fuller reads
            time.sleep(min(rest / 1e9, timeout))
            timeout = self._timeout()
        events = self.sel.select(timeout)
        self.last_turn_ns = time.monotonic_ns()
        self.turns += 1
        control = False
        read = self._read
        for key, mask in events:
            client: Client | None = key.data
            if client is None:
                control = True
                continue
            if mask & selectors.EVENT_READ:
                read(client)
            if mask & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                self._flush(client)
        if self.acc_frames and (control or self.acc_frames >= ACCOUNT_FRAMES
                                or time.monotonic_ns() - self.acc_times[0] >= ACCOUNT_NS):
            self._account()
        if self.send_k < self.send_total:
            self._send_due()
        elif self.burst:
            self._burst_check()
        if control:
            self._control()

    def _timeout(self) -> float:
        limit = 0.05 if self.burst else 1.0
        if self.acc_frames:
            limit = min(limit, max(0.0, (self.acc_times[0] + ACCOUNT_NS
                                         - time.monotonic_ns()) / 1e9))
        if self.send_k < self.send_total:
            due = self.send_t0 + self.send_k * self.send_interval
            limit = min(limit, max(0.0, (due - time.monotonic_ns()) / 1e9))
        return limit

    def _control(self) -> None:
        try:
            msg: dict[str, Any] = self.control.recv()
        except (EOFError, OSError):
            self.quit = True  # the parent is gone
            return
        cmd = msg["cmd"]
        reply: dict[str, Any]
        if cmd == "connect":
            reply = self._connect(msg)
        elif cmd == "probe":
            reply = self._probe(msg["seq"])
        elif cmd == "probe_count":
            reply = {"count": self.probe_seen.get(msg["seq"], 0)}
        elif cmd == "run":
            reply = self._start_step(msg)
        elif cmd == "status":
            reply = self._status()
        elif cmd == "stats":
            reply = self._stats()
        elif cmd == "disconnect":
            self._close_clients()
            reply = {"ok": True}
        elif cmd == "churn":
            reply = Churn(msg).run()
        elif cmd == "quit":
            self.quit = True
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        self.control.send(reply)

    def _connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._close_clients()
        self.size = msg["size"]
        self.dtype = frame_dtype(self.size)
        self.tail = frame_tail(self.size)
        self.total_clients = msg["total"]
        host, port, base = msg["host"], msg["port"], msg["base"]
        errors: dict[str, int] = {}
        socks = self._open((host, port), msg["count"], msg["timeout"], errors,
                           in_flight=msg["in_flight"], rate=msg["rate"])
        for i, sock in enumerate(socks):
            if sock is None:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = Client(sock, len(self.clients), base + i)
            self.clients.append(client)
            self.by_fd[sock.fileno()] = client
            self.sel.register(sock, selectors.EVENT_READ, client)
        self.gids = np.asarray([c.gid for c in self.clients], dtype=np.int64)
        self.step = 0
        self.verify = False
        self._reset_stats()
        return {"connected": len(self.clients), "errors": errors}

    def _open(self, addr: tuple[str, int], count: int, timeout: float, errors: dict[str, int],
              *, in_flight: int, rate: float) -> list[socket.socket | None]:
        """The sockets of a connect (None where one failed): ``connect_many``'s; a subclass may
        do more with each as it connects (``bench/websocket.py``: the upgrade)."""
        return connect_many(addr, count, timeout, errors, in_flight=in_flight, rate=rate)

    def _close_clients(self) -> None:
        for client in self.clients:
            if client.sock.fileno() >= 0:
                self.sel.unregister(client.sock)
                client.sock.close()
        self.clients = []
        self.by_fd = {}
        self.send_total = self.send_k = 0
        self.burst = False

    def _probe(self, seq: int) -> dict[str, Any]:
        for client in self.clients:
            if client.sock.fileno() >= 0:
                frame = HEADER.pack(MAGIC, PROBE_STEP, client.gid, seq, time.monotonic_ns())
                self._send(client, frame + self.tail)
                return {"ok": True}
        return {"ok": False}

    def _start_step(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.step = msg["step"]
        self.verify = bool(msg["verify"])
        self.burst = bool(msg["burst"])
        self._reset_stats()
        n = len(self.clients)
        start_ns: int = msg["start_ns"]
        if self.burst:
            self.send_total = self.send_k = 0
            self.send_end = start_ns + int(msg["duration"] * 1e9)
            self.burst_seq = [0] * n
            self.send_t0 = start_ns
            for client in self.clients:
                if client.sock.fileno() >= 0 and not client.writing:
                    client.writing = True
                    self.sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                    client)
        else:
            per_client: int = msg["per_client"]
            self.send_total = n * per_client
            self.send_k = 0
            rate = n * msg["rate"]  # frames per second from this worker
            self.send_interval = 1e9 / rate if rate > 0 else 0.0
            self.send_t0 = start_ns + int(msg["phase"] * self.send_interval)
        return {"ok": True, "frames": self.send_total}

    def _status(self) -> dict[str, Any]:
        pending = sum(1 for c in self.clients if c.pending)
        done = self.send_k >= self.send_total and not self.burst and pending == 0
        return {"sent": self.sent, "done": done, "received": self.received,
                "stale": self.stale, "disconnects": self.disconnects,
                "last_send_ns": self.last_send_ns}

    def _stats(self) -> dict[str, Any]:
        return {
            "hist": self.hist.tolist(), "received": self.received, "echo": self.echo,
            "order_gaps": self.order_gaps, "order_back": self.order_back, "stale": self.stale,
            "garbled_bytes": self.garbled_bytes, "disconnects": self.disconnects,
            "partial_sends": self.partial_sends, "eagain": self.eagain, "sent": self.sent,
            "lag_max_ns": self.lag_max_ns, "lag_sum_ns": self.lag_sum_ns,
            "max_latency_ns": self.max_latency_ns, "last_send_ns": self.last_send_ns,
            "cpu": own_cpu() - self.cpu0, "wall": time.monotonic() - self.wall0,
            "pending_bytes": sum(len(c.pending) for c in self.clients),
            "turns": self.turns, "reads": self.reads,
        }

    # -- sending -------------------------------------------------------------------------------

    def _send(self, client: Client, data: bytes) -> None:
        if client.pending:
            client.pending += data
            return
        try:
            sent = client.sock.send(data)
        except BlockingIOError:
            sent = 0
            self.eagain += 1
        except OSError:
            self._lost(client)
            return
        if sent < len(data):
            if sent:
                self.partial_sends += 1
            client.pending = data[sent:]
            if not client.writing:
                client.writing = True
                self.sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _flush(self, client: Client) -> None:
        if self.burst and not client.pending and time.monotonic_ns() < self.send_end:
            self._burst_fill(client)
            return
        if client.pending:
            try:
                sent = client.sock.send(client.pending)
            except BlockingIOError:
                return
            except OSError:
                self._lost(client)
                return
            client.pending = client.pending[sent:]
        if not client.pending and client.writing and not self.burst:
            client.writing = False
            self.sel.modify(client.sock, selectors.EVENT_READ, client)

    def _send_due(self) -> None:
        now = time.monotonic_ns()
        clients = self.clients
        n = len(clients)
        tail = self.tail
        pack = HEADER.pack
        step = self.step
        k = self.send_k
        t0 = self.send_t0
        interval = self.send_interval
        end = min(self.send_total, k + MAX_SENDS_PER_TURN)
        while k < end:
            due = t0 + int(k * interval)
            if due > now:
                break
            client = clients[k % n]
            if client.sock.fileno() >= 0:
                ts = time.monotonic_ns()
                lag = ts - due
                self.lag_sum_ns += lag
                self.lag_max_ns = max(self.lag_max_ns, lag)
                self._send(client, pack(MAGIC, step, client.gid, k // n, ts) + tail)
                self.sent += 1
                self.last_send_ns = ts
            k += 1
        self.send_k = k

    def _burst_fill(self, client: Client) -> None:
        per = max(1, BURST_BYTES // self.size)
        ts = time.monotonic_ns()
        seq = self.burst_seq[client.index]
        tail = self.tail
        frames = b"".join(HEADER.pack(MAGIC, self.step, client.gid, seq + i, ts) + tail
                          for i in range(per))
        self.burst_seq[client.index] = seq + per
        self.sent += per
        self.last_send_ns = ts
        self._send(client, frames)

    def _burst_check(self) -> None:
        if time.monotonic_ns() < self.send_end:
            return
        self.burst = False
        for client in self.clients:
            if client.writing and not client.pending and client.sock.fileno() >= 0:
                client.writing = False
                self.sel.modify(client.sock, selectors.EVENT_READ, client)

    # -- receiving -----------------------------------------------------------------------------

    def _lost(self, client: Client) -> None:
        if client.sock.fileno() >= 0:
            self.sel.unregister(client.sock)
            client.sock.close()
            self.disconnects += 1
        client.pending = b""

    def _recv(self, client: Client) -> tuple[bytes, int] | None:
        """One read of ``client``: what it left over before plus what came now, and when it
        came (ns); None when nothing came, or the connection is gone (counted, closed)."""
        try:
            got = client.sock.recv_into(self.rbuf)  # no 256 KiB allocation per call
        except BlockingIOError:
            return None
        except OSError:
            self._lost(client)
            return None
        if not got:
            self._lost(client)
            return None
        now = time.monotonic_ns()
        data = self.rview[:got].tobytes()
        self.reads += 1
        if client.rest:
            data = client.rest + data
        return data, now

    def _read(self, client: Client) -> None:
        read = self._recv(client)
        if read is None:
            return
        data, now = read
        size = self.size
        whole = len(data) - len(data) % size
        if whole and (data[:4] != MAGIC_BYTES or data[whole - 4:whole] != TRAILER_BYTES):
            data, whole = self._resync(data)  # rare: the stream is not aligned on frames
        client.rest = data[whole:]
        if whole:
            self.acc_chunks.append(data[:whole] if whole < len(data) else data)
            self.acc_owners.append(client.index)
            self.acc_times.append(now)
            self.acc_counts.append(whole // size)
            self.acc_frames += whole // size

    def _resync(self, data: bytes) -> tuple[bytes, int]:
        """Keep the well-formed frames of ``data``; skip what is not; keep a partial tail."""
        size = self.size
        good: list[bytes] = []
        i = 0
        n = len(data)
        for _ in range(n + 1):  # each pass moves i forward by at least one byte
            if i + size > n:
                break
            if data[i:i + 4] == MAGIC_BYTES and data[i + size - 4:i + size] == TRAILER_BYTES:
                good.append(data[i:i + size])
                i += size
                continue
            j = data.find(MAGIC_BYTES, i + 1)
            skip_to = j if j >= 0 else max(i + 1, n - 3)
            self.garbled_bytes += skip_to - i
            i = skip_to
        clean = b"".join(good)
        return clean + data[i:], len(clean)

    def _account(self) -> None:
        """Parse and count every frame read since the last call."""
        chunks, owners, times = self.acc_chunks, self.acc_owners, self.acc_times
        counts = np.asarray(self.acc_counts, dtype=np.int64)
        self.acc_chunks, self.acc_owners, self.acc_times, self.acc_counts = [], [], [], []
        self.acc_frames = 0
        size = self.size
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        frames = np.frombuffer(buf, dtype=self.dtype)
        well_formed = (frames["magic"] == MAGIC) & (frames["trailer"] == TRAILER)
        if not well_formed.all():  # rare: a frame was split inside a chunk; resync those chunks
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            bad = np.add.reduceat((~well_formed).astype(np.int64), starts) > 0
            kept: list[tuple[bytes, int, int]] = []
            for i, chunk in enumerate(chunks):
                good = chunk
                if bad[i]:
                    clean, whole = self._resync(chunk)
                    self.garbled_bytes += len(clean) - whole
                    good = clean[:whole]
                if good:
                    kept.append((good, owners[i], times[i]))
            if not kept:
                return
            chunks = [k[0] for k in kept]
            owners = [k[1] for k in kept]
            times = [k[2] for k in kept]
            frames = np.frombuffer(b"".join(chunks), dtype=self.dtype)
            counts = np.fromiter((len(c) // size for c in chunks), dtype=np.int64,
                                 count=len(chunks))
        owner_of = np.repeat(np.asarray(owners, dtype=np.int64), counts)
        time_of = np.repeat(np.asarray(times, dtype=np.int64), counts)
        steps = frames["step"]
        current = steps == self.step
        if not current.all():
            probes = steps == PROBE_STEP
            if probes.any():
                self._probes(frames["seq"][probes], owner_of[probes])
            self.stale += int((~current & ~probes).sum())
            frames, owner_of, time_of = frames[current], owner_of[current], time_of[current]
            if not len(frames):
                return
        self.received += len(frames)
        latency = time_of - frames["ts"].astype(np.int64)
        top = int(latency.max())
        self.max_latency_ns = max(self.max_latency_ns, top)
        self.hist += buckets(latency)
        senders = frames["sender"].astype(np.int64)
        self.echo += int((senders == self.gids[owner_of]).sum())
        if self.verify:
            self._check_order(owner_of * self.total_clients + senders,
                              frames["seq"].astype(np.int64))

    def _check_order(self, keys: I64Array, seqs: I64Array) -> None:
        order = np.argsort(keys, kind="stable")  # arrival order kept within each pair
        k = keys[order]
        s = seqs[order]
        prev = np.empty_like(s)
        prev[1:] = s[:-1]
        first = np.ones(len(k), dtype=bool)
        first[1:] = k[1:] != k[:-1]
        prev[first] = self.last_seq[k[first]]
        step = s - prev
        self.order_gaps += int((step > 1).sum())
        self.order_back += int((step < 1).sum())
        last = np.ones(len(k), dtype=bool)
        last[:-1] = first[1:]
        self.last_seq[k[last]] = s[last]

    def _probes(self, seqs: npt.NDArray[np.uint32], owners: I64Array) -> None:
        seen: set[tuple[int, int]] = set(zip(seqs.tolist(), owners.tolist(), strict=True))
        for seq, _owner in seen:
            self.probe_seen[seq] = self.probe_seen.get(seq, 0) + 1


def worker_main(control: Connection, wid: int, lifetime: float) -> None:
    raise_nofile()
    Worker(control, wid, lifetime).serve()


# -- the accept-rate test (runs inside worker 0) --------------------------------------------------


class Churn:
    """Open ``count`` connections, at most ``concurrency`` at once; each sends one frame and is
    closed as soon as an observer client has received that frame through the relay."""

    def __init__(self, msg: dict[str, Any]) -> None:
        self.addr = (msg["host"], msg["port"])
        self.count: int = msg["count"]
        self.concurrency: int = msg["concurrency"]
        self.size: int = msg["size"]
        self.conn_timeout: float = msg["conn_timeout"]
        self.timeout: float = msg["timeout"]
        self.tail = frame_tail(self.size)
        self.sel = selectors.DefaultSelector()
        self.live: dict[int, tuple[socket.socket, float]] = {}
        self.done = self.failed = self.next_id = 0
        self.errors: dict[str, int] = {}
        self.rest = b""

    def run(self) -> dict[str, Any]:
        observer = socket.create_connection(self.addr, timeout=5.0)
        observer.setblocking(False)
        try:
            self.sel.register(observer, selectors.EVENT_READ, -1)
            if not self._observer_in_chat(observer):
                return {"error": "the observer never heard the probe client"}
            start = time.monotonic()
            deadline = start + self.timeout
            for _ in range(self.count * 1000 + 100_000):  # bounded, and by the deadline
                if self.done + self.failed >= self.count or time.monotonic() > deadline:
                    break
                self._open_more()
                for key, mask in self.sel.select(0.05):
                    if key.data == -1:
                        self._observe(observer)
                    else:
                        self._client_event(key.data, mask)
                self._expire()
            elapsed = time.monotonic() - start
            for cid in list(self.live):
                self._fail(cid, "unfinished")
            return {"done": self.done, "failed": self.failed, "errors": self.errors,
                    "seconds": elapsed}
        finally:
            for cid in list(self.live):
                self._fail(cid, "unfinished")
            self.sel.close()
            observer.close()

    def _observer_in_chat(self, observer: socket.socket) -> bool:
        """The observer must be in the chat before the clock starts: a probe client says so."""
        probe = socket.create_connection(self.addr, timeout=5.0)
        heard = False
        try:
            for attempt in range(50):
                probe.sendall(HEADER.pack(MAGIC, PROBE_STEP, 0, attempt, 0) + self.tail)
                if self.sel.select(0.1):
                    heard = bool(observer.recv(RECV_SIZE))
                    if heard:
                        break
        finally:
            probe.close()
        time.sleep(0.2)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):  # empty what the probes left
                if not observer.recv(RECV_SIZE):
                    break
        return heard

    def _fail(self, cid: int, why: str) -> None:
        sock, _ = self.live.pop(cid)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        sock.close()
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1

    def _open_more(self) -> None:
        while len(self.live) < self.concurrency and self.next_id < self.count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            cid = self.next_id
            self.next_id += 1
            self.live[cid] = (sock, time.monotonic())
            code = sock.connect_ex(self.addr)
            if code not in (0, errno.EINPROGRESS):
                self._fail(cid, errno.errorcode.get(code, str(code)))
                continue
            self.sel.register(sock, selectors.EVENT_WRITE, cid)

    def _observe(self, observer: socket.socket) -> None:
        try:
            data = self.rest + observer.recv(RECV_SIZE)
        except BlockingIOError:
            return
        whole = len(data) - len(data) % self.size
        self.rest = data[whole:]
        for off in range(0, whole, self.size):
            magic, step, _sender, seq, _ts = HEADER.unpack_from(data, off)
            if magic == MAGIC and step == CHURN_STEP and seq in self.live:
                sock, _ = self.live.pop(seq)
                self.sel.unregister(sock)
                with contextlib.suppress(OSError):  # unread data would make close() a reset
                    for _ in range(64):
                        if not sock.recv(RECV_SIZE):
                            break
                sock.close()
                self.done += 1

    def _client_event(self, cid: int, mask: int) -> None:
        if cid not in self.live:
            return
        sock = self.live[cid][0]
        if mask & selectors.EVENT_WRITE:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(cid, errno.errorcode.get(err, str(err)))
                return
            try:
                sock.send(HEADER.pack(MAGIC, CHURN_STEP, cid, cid, time.monotonic_ns())
                          + self.tail)
            except OSError as exc:
                self._fail(cid, errno.errorcode.get(exc.errno or 0, "send"))
                return
            self.sel.modify(sock, selectors.EVENT_READ, cid)
            return
        try:
            if not sock.recv(RECV_SIZE):  # others' frames are read and dropped
                self._fail(cid, "closed_by_server")
        except BlockingIOError:
            pass
        except OSError as exc:
            self._fail(cid, errno.errorcode.get(exc.errno or 0, "recv"))

    def _expire(self) -> None:
        now = time.monotonic()
        for cid, (_sock, born) in list(self.live.items()):
            if now - born > self.conn_timeout:
                self._fail(cid, "timeout")


# -- the coordinator (parent side) ---------------------------------------------------------------


@dataclass
class StepResult:
    clients: int
    rate: float  # frames per second per client (paced); 0 in burst mode
    duration: float  # planned seconds of sending
    offered_msgs: float  # frames per second, all clients
    offered_deliveries: float  # deliveries per second (frames x other clients)
    sent: int
    expected: int
    received: int
    lost: int
    echo: int
    order_gaps: int
    order_back: int
    garbled_bytes: int
    stale: int
    disconnects: int
    partial_sends: int
    eagain: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    delivered_per_s: float
    send_s: float  # from the planned start to the last send (planned: ``duration``)
    drain_s: float
    gen_lag_max_ms: float
    gen_cpu_frac: float
    verified: bool
    gen_turns: int = 0
    gen_reads: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class ConnectResult:
    connected: int
    errors: dict[str, int]
    in_chat: bool  # a probe from one client reached every other one
    reached: int  # the most clients one probe reached (the sender not counted)
    seconds: float


class LoadGen:
    """Worker processes, each with a share of the clients, driven over pipes."""

    def __init__(self, procs: int = 1, lifetime: float = 3600.0, *,
                 target: Callable[..., None] = worker_main, extra: tuple[Any, ...] = (),
                 name: str = "loadgen") -> None:
        """``target(control, wid, lifetime, *extra)`` runs in each worker process."""
        ctx = mp.get_context("fork")
        self.workers: list[tuple[mp.process.BaseProcess, Connection]] = []
        self.clients = 0
        self.host = "127.0.0.1"
        self.port = 0
        self.size = 64
        self.step = 0
        self.probe_seq = 0
        for wid in range(max(1, procs)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, wid, lifetime, *extra), daemon=True,
                               name=f"{name}-{wid}")
            proc.start()
            child.close()
            self.workers.append((proc, parent))

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, wid: int, msg: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        conn = self.workers[wid][1]
        conn.send(msg)
        if not conn.poll(timeout):
            raise TimeoutError(f"loadgen worker {wid} did not answer {msg['cmd']!r} in {timeout}s")
        reply: dict[str, Any] = conn.recv()
        return reply

    def _ask_all(self, msgs: list[dict[str, Any]], timeout: float = 30.0) -> list[dict[str, Any]]:
        for (_, conn), msg in zip(self.workers, msgs, strict=True):
            conn.send(msg)
        replies: list[dict[str, Any]] = []
        for wid, (_, conn) in enumerate(self.workers):
            if not conn.poll(timeout):
                raise TimeoutError(f"loadgen worker {wid} did not answer in {timeout}s")
            replies.append(conn.recv())
        return replies

    def connect(self, host: str, port: int, clients: int, *, size: int = 64,
                timeout: float = 60.0, barrier_timeout: float = 20.0,
                in_flight: int = CONNECT_IN_FLIGHT, rate: float = CONNECT_RATE,
                ) -> ConnectResult:
        """Connect ``clients`` clients and wait until a probe from one reaches all the others."""
        if size < MIN_SIZE:
            raise ValueError(f"size must be at least {MIN_SIZE} bytes")
        started = time.monotonic()
        self.host, self.port, self.size = host, port, size
        shares = [clients // len(self.workers)] * len(self.workers)
        for i in range(clients % len(self.workers)):
            shares[i] += 1
        bases = [sum(shares[:i]) for i in range(len(shares))]
        msgs = [{"cmd": "connect", "host": host, "port": port, "count": share, "base": base,
                 "total": clients, "size": size, "timeout": timeout, "in_flight": in_flight,
                 "rate": rate / len(self.workers)}
                for share, base in zip(shares, bases, strict=True)]
        replies = self._ask_all(msgs, timeout + 10)
        connected = sum(r["connected"] for r in replies)
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        self.clients = connected
        reached = self.barrier(barrier_timeout)
        in_chat = connected == clients and reached >= clients - 1
        return ConnectResult(connected, errors, in_chat, reached, time.monotonic() - started)

    def barrier(self, timeout: float = 20.0) -> int:
        """Send probes from client 0 until one reaches every other client, or the timeout;
        return the most clients one probe reached."""
        if self.clients < 2:
            return max(0, self.clients - 1)
        deadline = time.monotonic() + timeout
        best = 0
        while time.monotonic() < deadline:
            self.probe_seq += 1
            seq = self.probe_seq
            self._ask(0, {"cmd": "probe", "seq": seq})
            wait_until = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < wait_until:
                got = sum(int(self._ask(w, {"cmd": "probe_count", "seq": seq})["count"])
                          for w in range(len(self.workers)))
                best = max(best, got)
                if got >= self.clients - 1:
                    return got
                time.sleep(0.05)
        return best

    def disconnect(self) -> None:
        self._ask_all([{"cmd": "disconnect"}] * len(self.workers))
        self.clients = 0

    def status(self) -> list[dict[str, Any]]:
        return self._ask_all([{"cmd": "status"}] * len(self.workers))

    def quiesce(self, quiet: float = 0.5, timeout: float = 15.0) -> bool:
        """Wait until no frame has arrived for ``quiet`` seconds (what an overload left behind)."""
        deadline = time.monotonic() + timeout
        last = -1
        since = time.monotonic()
        while time.monotonic() < deadline:
            total = sum(s["received"] + s["stale"] for s in self.status())
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return True
            time.sleep(0.05)
        return False

    def run(self, rate: float, duration: float, *, burst: bool = False, verify: bool = False,
            drain_timeout: float = 5.0) -> StepResult:
        """One step: every client sends ``rate`` frames/s (or bursts) for about ``duration``."""
        n = self.clients
        self.step += 1
        per_client = 0 if burst else max(1, round(rate * duration))
        planned = duration if burst else per_client / rate
        start_ns = time.monotonic_ns() + 100_000_000
        nw = len(self.workers)
        msgs = [{"cmd": "run", "step": self.step, "rate": rate, "per_client": per_client,
                 "duration": duration, "start_ns": start_ns, "phase": wid / nw,
                 "verify": verify, "burst": burst} for wid in range(nw)]
        self._ask_all(msgs)
        # sending: wait for the planned time, then until every worker has sent everything
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9 + planned))
        send_deadline = time.monotonic() + max(10.0, planned)
        statuses = self.status()
        while not all(s["done"] for s in statuses) and time.monotonic() < send_deadline:
            time.sleep(0.02)
            statuses = self.status()
        sent = sum(s["sent"] for s in statuses)
        expected = sent * (n - 1)
        sent_done = time.monotonic()
        drain_deadline = sent_done + drain_timeout
        while time.monotonic() < drain_deadline:
            if sum(s["received"] for s in statuses) >= expected:
                break
            if any(s["disconnects"] for s in statuses):
                break
            time.sleep(0.02)
            statuses = self.status()
        drain_s = time.monotonic() - sent_done
        stats = self._ask_all([{"cmd": "stats"}] * nw)
        return self._result(stats, n=n, rate=rate, planned=planned, burst=burst, verify=verify,
                            expected=expected, drain_s=drain_s,
                            all_sent=all(s["done"] for s in statuses), start_ns=start_ns)

    def _result(self, stats: list[dict[str, Any]], *, n: int, rate: float, planned: float,
                burst: bool, verify: bool, expected: int, drain_s: float, all_sent: bool,
                start_ns: int) -> StepResult:
        hist = histogram()
        for s in stats:
            hist += np.asarray(s["hist"], dtype=np.int64)

        def total(name: str) -> int:
            return int(sum(s[name] for s in stats))

        sent, received = total("sent"), total("received")
        last_send = max(s["last_send_ns"] for s in stats)
        window = max(1e-9, (last_send - start_ns) / 1e9 + drain_s)
        res = StepResult(
            clients=n, rate=0.0 if burst else rate, duration=planned,
            offered_msgs=(sent / planned) if burst else n * rate,
            offered_deliveries=(sent * (n - 1) / planned) if burst else n * rate * (n - 1),
            sent=sent, expected=expected, received=received, lost=max(0, expected - received),
            echo=total("echo"), order_gaps=total("order_gaps"), order_back=total("order_back"),
            garbled_bytes=total("garbled_bytes"), stale=total("stale"),
            disconnects=total("disconnects"), partial_sends=total("partial_sends"),
            eagain=total("eagain"),
            p50_ms=percentile_ns(hist, 50) / 1e6, p90_ms=percentile_ns(hist, 90) / 1e6,
            p99_ms=percentile_ns(hist, 99) / 1e6,
            max_ms=max(s["max_latency_ns"] for s in stats) / 1e6,
            delivered_per_s=received / window, send_s=(last_send - start_ns) / 1e9,
            drain_s=drain_s,
            gen_lag_max_ms=max(s["lag_max_ns"] for s in stats) / 1e6,
            gen_cpu_frac=sum(s["cpu"] for s in stats) / max(1e-9, *(s["wall"] for s in stats)),
            verified=verify, gen_turns=total("turns"), gen_reads=total("reads"))
        if not all_sent:
            res.errors.append("not all frames could be sent")
        for name in ("lost", "echo", "disconnects", "garbled_bytes"):
            if getattr(res, name):
                res.errors.append(f"{name}={getattr(res, name)}")
        if verify and (res.order_gaps or res.order_back):
            res.errors.append(f"order: {res.order_gaps} gaps, {res.order_back} back")
        if received > expected:
            res.errors.append(f"duplicates: {received - expected} more frames than sent")
        return res

    def churn(self, count: int, concurrency: int = 16, conn_timeout: float = 5.0,
              timeout: float = 60.0) -> dict[str, Any]:
        return self._ask(0, {"cmd": "churn", "host": self.host, "port": self.port,
                             "count": count, "concurrency": concurrency, "size": self.size,
                             "conn_timeout": conn_timeout, "timeout": timeout}, timeout + 30)

    def close(self) -> None:
        for _proc, conn in self.workers:
            with contextlib.suppress(OSError):
                conn.send({"cmd": "quit"})
        for proc, conn in self.workers:
            proc.join(timeout=3.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=3.0)
            conn.close()
        self.workers = []

