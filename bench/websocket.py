"""What WebSocket costs fsmchat per delivered message, against plain TCP: one build, one load.

    python bench/websocket.py [--quick] [--json PATH] [--repeats 3] [--clients 50]
                              [--rates 10,20] [--capacity-clients 500] [--fsmchat DIR] [--out DIR]

Every run starts a fresh server with the same command line,

    python -m fsmchat --host 127.0.0.1 --port 0 --web-port 0 --log-level info --drain-timeout 2

(raw mode) and its clients connect either all to ``port`` (``plain``) or all to ``web_port``
(``WebSocket``, ``GET /ws``, no Origin, no extension): the relay, its options and the load are
the same, only the transport differs. The steps, their options and figures are ``bench/tls.py``'s
(``harness.alternating``): runs alternate plain, WebSocket, plain, ... (``--repeats`` of each);
each run measures paced 64-byte messages at 10 and 20 msg/s from 50 clients (the goal: at
20 msg/s, server CPU per delivery at most ``GOAL`` times plain TCP's), 4,096-byte ones at the
first rate, and 20 clients bursting. Then, unless ``--capacity-clients 0``, the capacity at 500
clients of each transport (``harness.capacity``: the highest delivery rate with p99 under
50 ms and nothing lost, echoed or out of order), each in a server of its own.

The WebSocket clients are ``harness.counting``'s workers with ``WsSocket`` in place of the
plain socket: each client sends its upgrade request as it connects (16 connections at a time,
each upgraded, blocking, before the next ones open: the web port evicts connections that wait
without a request once 64 are open), then every ``send`` of the load generator is one masked
binary frame (a fixed mask key, not zero: the server unmasks it for real; the generator's XOR
is one big-integer operation) and ``recv_into`` hands over the payloads of the server's frames
(a read of frames of one size, the usual case, is unpacked with slices, or numpy for long runs,
without a loop over headers). The generator stays cheap, so it does not compete with the
server. Pings are answered; at the end every client sends a close frame and reads until the
server's, so nobody is reset. Figures count payload bytes (a delivery is a message's bytes at
one other client), and the totals checked against ``server.stopped`` count wire bytes: request,
frames, close.

Prints the tables (min / median / max per configuration, WebSocket over plain; the capacities),
progress on stderr; the result goes to ``results/websocket-<date>.json``. Exit status 1 on an
error in any run. ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from harness.alternating import Run, alternate, one_run, parse, report
from harness.capacity import Capacity, judge, search, short
from harness.counting import HANDSHAKE_TIMEOUT, CountingWorker, Generator, PlainSocket
from harness.loadgen import connect_many
from harness.report import Table, cell, say
from harness.server import HOST, Server, fsmchat, raise_nofile
from harness.suite import Session, sigint_ignored, usage_error

CONFIGS = ("plain", "ws")
LABEL = {"plain": "plain", "ws": "WebSocket"}
GOAL = 1.3  # WebSocket's CPU per delivery over plain TCP's at 64 B x 20 msg/s, at most
GOAL_STEP = "64B@20"

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"fsmchat-bench-16").decode()  # any 16 bytes: the server checks none
ACCEPT = base64.b64encode(hashlib.sha1(KEY.encode() + GUID).digest())
MASK = b"\x5a\xc3\x96\x3c"  # a fixed key, not zero: the server unmasks for real
MAX_FRAME = 16 * 1024  # payload of one client frame at most (the server's limit is 64 KiB)
BINARY, CLOSE, PING, PONG = 0x2, 0x8, 0x9, 0xA
GOODBYE_TIMEOUT = 5.0
NUMPY_FRAMES = 16  # a run of this many frames of one size is unpacked with numpy
UPGRADE_BATCH = 16  # connections opened at once, each upgraded before the next batch


def mask(payload: bytes) -> bytes:
    """``payload`` XOR ``MASK`` repeated: one big-integer XOR, not a loop over bytes."""
    n = len(payload)
    key = (MASK * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


def client_frame(opcode: int, payload: bytes) -> tuple[bytes, int]:
    """A masked client frame, and the length of its header (mask key included)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    head += MASK
    return head + mask(payload), len(head)


class WsSocket(PlainSocket):
    """A WebSocket client as loadgen's worker expects a non-blocking socket to behave.

    ``send(data)`` sends ``data`` as one masked binary frame (at most ``MAX_FRAME`` of it) and
    says how many bytes of ``data`` are out: a frame half written stays here, its payload
    "not sent yet" to the caller, who hands those bytes back with the next ``send`` (loadgen
    keeps what a send did not take and sends it first). ``recv_into`` reads frames and returns
    their payloads; a ping is answered; the server's close frame is an EOF. ``rx``/``tx``
    count payload bytes, ``rx_all``/``tx_all`` every byte on the wire."""

    def setup(self) -> None:
        self._in = b""  # bytes read, not yet a whole frame
        self._out = b""  # frame bytes not written yet: the tail of one data frame, then control
        self._head_left = 0  # header bytes of that data frame still in _out
        self._owed = 0  # its payload bytes still in _out (not reported as sent)
        self._spill = b""  # payload read past the caller's buffer (handed out next)
        self._closed = False  # the server's close frame came
        self._rbuf = bytearray(256 * 1024)
        self._rview = memoryview(self._rbuf)

    def handshake(self, host: str, port: int, timeout: float) -> None:
        """The upgrade (blocking), then non-blocking."""
        self.setup()
        self.settimeout(timeout)
        request = (f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        socket.socket.sendall(self, request)
        self.tx_all += len(request)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = socket.socket.recv(self, 4096)
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            got += chunk
        self.rx_all += len(got)
        end = got.index(b"\r\n\r\n") + 4
        head = got[:end]
        if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
            raise ConnectionError(f"no upgrade: {head[:80]!r}")
        self._in = got[end:]
        self.setblocking(False)

    # -- sending ---------------------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0, /) -> int:
        done = 0
        if self._out:
            done = self._write()  # the payload of the frame half written: data's first bytes
            if self._out:
                return self._sent(done)
        rest = len(data) - done
        if rest <= 0:  # only control frames were left
            return self._sent(done)
        payload = bytes(data[done:done + MAX_FRAME])
        frame, head = client_frame(BINARY, payload)
        self._out, self._head_left, self._owed = frame, head, len(payload)
        return self._sent(done + self._write())

    def _sent(self, count: int) -> int:
        self.tx += count
        return count

    def _write(self) -> int:
        """Write what ``_out`` holds; the data frame's payload bytes that went out now."""
        try:
            n = socket.socket.send(self, self._out)
        except BlockingIOError:
            return 0
        self.tx_all += n
        self._out = self._out[n:]
        head = min(n, self._head_left)
        self._head_left -= head
        payload = min(n - head, self._owed)
        self._owed -= payload
        return payload

    def _control(self, opcode: int, payload: bytes) -> None:
        """Queue a control frame after the data frame (never inside it) and try to send it."""
        self._out += client_frame(opcode, payload)[0]
        if not self._owed and not self._head_left:
            self._write()

    def send_close(self) -> None:
        self._control(CLOSE, struct.pack("!H", 1000))

    # -- receiving -------------------------------------------------------------------------------

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        view = memoryview(buffer)
        room = nbytes or len(view)
        if self._spill:
            return self._hand(view, room, self._spill)
        if self._closed:
            return 0
        if self._out and not self._owed and not self._head_left:
            self._write()  # a pong that could not go out before
        want = max(4096, min(len(self._rbuf), room - len(self._in)))
        got = socket.socket.recv_into(self, self._rview[:want])
        if not got:
            return 0
        self.rx_all += got
        data = self._in + self._rview[:got].tobytes() if self._in else \
            self._rview[:got].tobytes()
        payload = self._frames(data)
        if not payload:
            if self._closed:
                return 0
            raise BlockingIOError
        return self._hand(view, room, payload)

    def _hand(self, view: memoryview, room: int, payload: bytes) -> int:
        n = min(room, len(payload))
        view[:n] = payload[:n]
        self._spill = payload[n:]
        self.rx += n
        return n

    def _frames(self, data: bytes) -> bytes:
        """The payloads of the whole frames at the start of ``data``; the rest is kept."""
        parts: list[bytes] = []
        end = len(data)
        i = self._uniform(data, parts)
        while end - i >= 2:
            b0, b1 = data[i], data[i + 1]
            if b1 & 0x80:
                raise ConnectionError("the server masked a frame")
            n, off = b1, 2
            if n == 126:
                if end - i < 4:
                    break
                n, off = int.from_bytes(data[i + 2:i + 4], "big"), 4
            elif n == 127:
                if end - i < 10:
                    break
                n, off = int.from_bytes(data[i + 2:i + 10], "big"), 10
            stop = i + off + n
            if stop > end:
                break
            opcode = b0 & 0x0F
            if opcode <= BINARY:  # continuation, text, binary
                parts.append(data[i + off:stop])
            elif opcode == PING:
                self._control(PONG, data[i + off:stop])
            elif opcode == CLOSE:
                self._closed = True
                i = stop
                break
            i = stop
        self._in = data[i:] if i < end else b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    def _uniform(data: bytes, parts: list[bytes]) -> int:
        """If ``data`` starts with a run of binary frames of one size (headers compared by
        slicing, not one by one), their payloads go to ``parts``; the bytes they took."""
        if len(data) < 2 or data[0] != 0x82 or data[1] >= 126:
            return 0
        first = data[1]
        size = first + 2
        count = len(data) // size
        span = count * size
        if count < 2 or data[0:span:size] != b"\x82" * count or \
                data[1:span:size] != bytes((first,)) * count:
            return 0
        if count >= NUMPY_FRAMES:
            rows = np.frombuffer(data, dtype=np.uint8, count=span).reshape(count, size)
            parts.append(rows[:, 2:].tobytes())
        else:
            parts += [data[j + 2:j + size] for j in range(0, span, size)]
        return span


class WsWorker(CountingWorker):
    """``harness.counting``'s worker with every client upgraded to a WebSocket as it connects:
    ``UPGRADE_BATCH`` connections at a time, each upgraded before the next batch opens, as a
    browser sends its request at once (the web port evicts connections that wait without a
    request once 64 are open)."""

    def _open(self, addr: tuple[str, int], count: int, timeout: float, errors: dict[str, int],
              *, in_flight: int, rate: float) -> list[socket.socket | None]:
        deadline = time.monotonic() + timeout
        out: list[socket.socket | None] = []
        while len(out) < count:
            batch = min(UPGRADE_BATCH, count - len(out))
            left = deadline - time.monotonic()
            if left <= 0:
                errors["timeout"] = errors.get("timeout", 0) + count - len(out)
                out += [None] * (count - len(out))
                break
            for raw in connect_many(addr, batch, left, errors, in_flight=in_flight, rate=rate):
                out.append(None if raw is None else self._handshake(raw, addr, errors))
        return out

    def _handshake(self, raw: socket.socket, addr: tuple[str, int],
                   errors: dict[str, int]) -> WsSocket | None:
        ws = WsSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        try:
            ws.handshake(*addr, HANDSHAKE_TIMEOUT)
        except (OSError, ValueError) as exc:
            why = f"upgrade: {type(exc).__name__}: {exc}"[:120]
            errors[why] = errors.get(why, 0) + 1
            ws.close()
            return None
        return ws

    def _upgrade(self, raw: socket.socket) -> PlainSocket:
        assert isinstance(raw, WsSocket), "every client was upgraded as it connected"
        return raw

    def _close_clients(self) -> None:
        self._goodbye()
        super()._close_clients()

    def _goodbye(self) -> None:
        """A close frame from every client, then read until the server's close (an EOF here):
        nothing is left unread, nobody is reset, and the wire totals are complete."""
        live: dict[int, WsSocket] = {}
        for client in self.clients:
            sock = client.sock
            if isinstance(sock, WsSocket) and sock.fileno() >= 0:
                try:
                    sock.send_close()
                except OSError:
                    continue
                live[sock.fileno()] = sock
        deadline = time.monotonic() + GOODBYE_TIMEOUT
        while live and time.monotonic() < deadline:
            for key, _mask in self.sel.select(0.1):
                ws = live.get(key.fd)
                if ws is None:
                    continue  # the control pipe: the parent waits for this command's answer
                try:
                    got = ws.recv_into(self.rbuf)
                except BlockingIOError:
                    continue
                except OSError:
                    got = 0
                if not got:
                    del live[key.fd]


def ws_worker_main(control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
    raise_nofile()
    WsWorker(control, wid, lifetime, ca).serve()


def server_argv() -> list[str]:
    return fsmchat("--port", "0", "--web-port", "0", "--log-level", "info",
                   "--drain-timeout", "2")


def port_of(config: str) -> Callable[[Server], int]:
    return lambda srv: int(srv.started.get("web_port") or 0) if config == "ws" else srv.port


# -- capacity at 500 clients -------------------------------------------------------------------


@dataclass(frozen=True)
class CapProfile:
    step_seconds: float
    growth: float
    refine: int
    max_up: int
    drain_timeout: float


CAP_FULL = CapProfile(step_seconds=4.0, growth=2.0, refine=2, max_up=9, drain_timeout=5.0)
CAP_QUICK = CapProfile(step_seconds=1.5, growth=3.0, refine=0, max_up=8, drain_timeout=3.0)


@dataclass
class CapRun:
    config: str
    clients: int
    deliveries: float | None = None
    note: str = ""
    passed_rate: float | None = None
    failed_rate: float | None = None
    failed_why: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def passed_step(self) -> dict[str, Any] | None:
        good = [s for s in self.steps if s["rate"] == self.passed_rate and not s["why"]]
        return good[-1] if good else None


def capacity_run(gen: Generator, config: str, clients: int, cap: CapProfile,
                 session: Session) -> CapRun:
    """One server, ``clients`` clients of one transport, the rate search."""
    run = CapRun(config, clients)
    srv = Server(f"{config}-capacity", server_argv(), session.logdir, read="all")
    say(f"- capacity: {LABEL[config]}, {clients} clients")
    try:
        srv.start()
        conn = gen.connect(HOST, port_of(config)(srv), clients, size=64, timeout=60,
                           barrier_timeout=20)
        if not conn.in_chat:
            raise RuntimeError(f"{conn.connected} of {clients} connected, a probe reached "
                               f"{conn.reached}; errors {conn.errors}")

        def trial(rate: float) -> list[str]:
            if not srv.alive():
                raise RuntimeError("the server died")
            cpu0, t0 = srv.cpu_seconds(), time.monotonic()
            res = gen.run(rate, cap.step_seconds, verify=True, drain_timeout=cap.drain_timeout)
            cores = (srv.cpu_seconds() - cpu0) / max(1e-9, time.monotonic() - t0)
            why = judge(res)
            run.steps.append({"rate": rate, "why": why, "server_cores": cores, **asdict(res)})
            say(f"  {short(res, why)}, server {cores:.2f} cores")
            if why and not gen.quiesce(timeout=15):
                say("  (still receiving 15 s after the step)")
            return why

        found: Capacity = search(trial, clients, 1.0, growth=cap.growth, refine=cap.refine,
                                 max_up=cap.max_up, min_rate=0.03)
        run.deliveries, run.note = found.deliveries, found.note
        run.passed_rate, run.failed_rate = found.passed_rate, found.failed_rate
        run.failed_why = found.failed_why
        gen.disconnect()
    except (RuntimeError, TimeoutError, OSError) as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
        say(f"  error: {exc}")
        with contextlib.suppress(Exception):
            gen.disconnect()
    finally:
        srv.stop()
    if srv.exit_status not in (0, None):
        run.errors.append(f"the server exited with status {srv.exit_status}")
    if srv.problems:
        run.errors.append(f"server warnings/errors: {dict(srv.problems)}")
    return run


def capacity_table(caps: list[CapRun], clients: int) -> Table:
    by = {c.config: c for c in caps}
    table = Table(f"capacity at {clients} clients, 64 B (p99 < 50 ms, nothing lost)",
                  ["figure", *(LABEL[c] for c in CONFIGS), "WebSocket/plain"])

    def row(label: str, value: Callable[[CapRun], float | None], fmt: str) -> None:
        got = [value(by[c]) if c in by else None for c in CONFIGS]
        ratio = got[1] / got[0] if got[0] and got[1] else None
        table.add(label, *(cell(v, fmt) for v in got), cell(ratio, "{:.2f}x"))

    def at_pass(name: str) -> Callable[[CapRun], float | None]:
        def value(c: CapRun) -> float | None:
            step = c.passed_step()
            return None if step is None else float(step[name])
        return value

    row("deliveries/s", lambda c: c.deliveries, "{:,.0f}")
    row("msg/s per client", lambda c: c.passed_rate, "{:.2f}")
    row("server CPU, cores", at_pass("server_cores"), "{:.2f}")
    row("p99 latency, ms", at_pass("p99_ms"), "{:.2f}")
    row("generator CPU, of its core", at_pass("gen_cpu_frac"), "{:.0%}")
    return table


def capacity_notes(caps: list[CapRun]) -> list[str]:
    out: list[str] = []
    for c in caps:
        if c.note:
            out.append(f"capacity: {LABEL[c.config]}: {c.note}")
        if c.failed_rate is not None:
            out.append(f"capacity: {LABEL[c.config]}: the step at {c.failed_rate:.2f} msg/s per "
                       f"client failed: {'; '.join(c.failed_why)}")
        out += [f"error: capacity {LABEL[c.config]}: {e}" for e in c.errors]
    return out


def goal_note(runs: list[Run]) -> list[str]:
    med: dict[str, float] = {}
    for config in CONFIGS:
        values = sorted(float(r.steps[GOAL_STEP]["us_per_delivery"]) for r in runs
                        if r.config == config and GOAL_STEP in r.steps
                        and r.steps[GOAL_STEP]["ok"] and r.steps[GOAL_STEP]["us_per_delivery"])
        if values:
            med[config] = values[len(values) // 2]
    if len(med) < 2:
        return [f"goal: no {GOAL_STEP} figure for both transports"]
    ratio = med["ws"] / med["plain"]
    verdict = "met" if ratio <= GOAL else "NOT met"
    return [f"goal: WebSocket CPU per delivery at {GOAL_STEP} {med['ws']:.2f} us against plain "
            f"{med['plain']:.2f} us: {ratio:.2f}x, goal <= {GOAL}x {verdict}"]


def extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capacity-clients", type=int, default=500, metavar="N",
                        help="clients of the capacity search of each transport; 0: none "
                             "(default: 500)")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(
        args_list, description="fsmchat: server CPU per delivered message over WebSocket "
        "against plain TCP, and the capacity at 500 WebSocket clients", extend=extend)
    if args.capacity_clients and args.capacity_clients < 2:
        usage_error("websocket", "--capacity-clients must be 0 or at least 2")
    cap = CAP_QUICK if args.quick else CAP_FULL
    session = Session("websocket", args, args_list, logdir=args.logdir)
    argv_ = server_argv()

    def body() -> int:
        with sigint_ignored():  # forked before any thread
            gens = {"plain": Generator(None, args.procs, name="ws-bench-plain"),
                    "ws": Generator(None, args.procs, target=ws_worker_main,
                                    name="ws-bench-ws")}
        try:
            def one(config: str, repeat: int) -> Run:
                return one_run(gens[config], config, repeat, argv=argv_, workloads=workloads,
                               prof=prof, session=session, labels=LABEL, port=port_of(config))

            runs = alternate(CONFIGS, prof, one)
            caps = [capacity_run(gens[c], c, args.capacity_clients, cap, session)
                    for c in ("ws", "plain")] if args.capacity_clients else []
        finally:
            for gen in gens.values():
                gen.close()
        extra = [capacity_table(caps, args.capacity_clients)] if caps else []
        status = report(session, runs, workloads, CONFIGS, labels=LABEL, prof=prof,
                        received={"ws": "exactly the payload bytes every other client sent"},
                        tables_after=extra, notes_after=goal_note(runs) + capacity_notes(caps),
                        server_command=" ".join(argv_[1:]), goal=GOAL,
                        capacity_profile=asdict(cap),
                        capacity=[asdict(c) for c in caps])
        return 1 if status or any(c.errors for c in caps) else 0

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
