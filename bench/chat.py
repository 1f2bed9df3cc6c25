"""What chat mode costs fsmchat per delivered message, against the raw relay: one build, one load.

    python bench/chat.py [--quick] [--json PATH] [--repeats 3] [--clients 50] [--history 100]
                         [--fsmchat DIR] [--out DIR]

Every run starts a fresh server with the same command line but for the mode,

    python -m fsmchat --host 127.0.0.1 --port 0 --log-level info --drain-timeout 2 --mode M
        --max-clients-per-addr 0

``raw`` (``--mode raw``: the byte relay), ``chat`` (``--mode chat``) and, unless ``--history
0``, ``chat+hN`` (``--mode chat --history N``, 100 by default). Runs alternate raw, chat,
chat+hN, raw, ... (``--repeats`` of each). The steps, the options and the figures are
``bench/tls.py``'s (``harness.alternating``): paced 64-byte messages at 10
and 20 msg/s from 50 clients, 4,096-byte ones at 10 msg/s, and 20 clients bursting; the server's
``utime + stime`` over the deliveries, and so on.

The clients differ in what they send and read. Raw runs use ``harness.counting``'s plain
clients and ``harness.frames``' binary frames, as in ``tls.py`` and ``run.py``. Chat runs use
``ChatWorker``: every frame goes out as a line of the same size, newline included,

    <header as 48 hex digits: magic step sender seq send-time> ......... |end \\n

(printable ASCII, which chat mode passes unchanged, and never a command), one ``send`` per line
in the paced steps; the server sends each other client ``<userN> `` + line. A reader keeps the
partial line at the end of each read for the next one, sets aside the server's notices (``* ...``;
from its welcome line a client takes its name), and turns the message lines back into frames
(numpy over each batch: a line's own text is the ``size`` bytes before its newline, whatever the
name before it; one ``bytes.fromhex``), so loadgen's checks and latency histogram work
unchanged: no loss, no echo, per-sender order, one-way latency. Also checked: every client
received exactly ``(size + len("<name> ")) x lines`` bytes of every other client, the name
being the one that client's welcome line gave it; every line of a sender has a prefix of the
same length, and one line per sender and batch carries the sender's own name; no notice or
malformed line during a step. To disconnect, a chat client half-closes and reads until the
server closes: it reads the others' ``* userN left`` notices, so nobody is reset, and at the
end of each run the server's ``bytes_in``/``bytes_out``/``connections`` must equal the clients'
counts exactly, as with raw. ``server.started`` must report the mode asked for.

A delivery is one message line to one other client, as a message is one frame in raw mode.
Prints two tables in ``tls.py``'s layout (chat against raw, chat+hN against raw; the raw
columns are the same), progress on stderr; the result goes to ``results/chat-<date>.json``.
Exit status 1 on an error in any run, or when the fsmchat sources changed during the bench.
``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time
from dataclasses import replace
from itertools import pairwise
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt
from harness.alternating import Run, alternate, check_bytes, finish_run, one_run, parse, report
from harness.counting import CountingWorker, Generator
from harness.frames import HEADER, MAGIC_BYTES, MIN_SIZE, frame_dtype, frame_tail
from harness.loadgen import Client
from harness.server import Server, fsmchat, raise_nofile
from harness.suite import Session, sigint_ignored, usage_error
from numpy.lib.stride_tricks import sliding_window_view as windows

HEX = 2 * HEADER.size  # the frame's header as hex digits, at the start of each line
LINE_END = b"|end\n"
MIN_LINE = HEX + len(LINE_END)
DEFAULT_MAX_LINE = 4096  # the server's --max-line default: longer lines would be cut
MAX_REST = 1 << 20  # a partial line longer than this is not one of ours: dropped as garbled
PAD_CHECKED = 16  # padding bytes checked at the start of each line's padding (and its end)
GOODBYE_TIMEOUT = 5.0
DRAIN_TIMEOUT = 30.0
"""The other suites wait 5 s at most (3 with --quick). A chat burst leaves megabytes of lines in the
kernel's socket buffers, here and in the generator's, which take a second or two to deliver
after the senders stop; this is headroom. A step that delivers everything ends as soon as it
has, so this only matters when one does not."""
NOTICE = b"*** "  # how the server's notices start
WELCOME = re.compile(rb"\*\*\* welcome, you are ([^ ]+) ")
PREFIX_BYTES = len(b"<> ")  # a message line's prefix, less the name
NAME_MAX = 16
NL, LT, GT, SP = b"\n<> "
HEXVAL = np.full(256, -1, dtype=np.int16)  # a hex digit's value, -1 for any other byte
HEXVAL[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
ACCOUNT_SIZE = MIN_SIZE
"""The frames a chat worker hands to loadgen's accounting: the header and the trailer, whatever
the size of the lines (their padding has been checked)."""
MAGIC_ROW = np.frombuffer(MAGIC_BYTES, dtype=np.uint8)
END = np.frombuffer(LINE_END, dtype=np.uint8)
DOT = ord(".")
U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]


def line_tail(size: int) -> bytes:
    return b"." * (size - MIN_LINE) + LINE_END


# -- the chat clients (inside the generator processes) -------------------------------------------


class ChatWorker(CountingWorker):
    """``harness.counting``'s worker (plain sockets) speaking lines: frames go out as text lines,
    message lines come back in as frames for loadgen's accounting, notices are set aside."""

    def __init__(self, control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
        # before Worker.__init__, which calls _reset_stats
        self.names: dict[int, bytes] = {}  # gid -> its name, from its welcome line
        self.notices: dict[str, int] = {}  # this step's notices, by kind
        self.notice_samples: list[str] = []
        self.garbled_lines = 0
        self.garbled_samples: list[str] = []
        self.senders: set[tuple[bytes, int]] = set()  # (name, sender) of this step's lines
        self.prefix_mismatch = 0  # lines whose prefix length differs from their sender's
        self._set_size(64)
        super().__init__(control, wid, lifetime, ca)
        self.dtype = frame_dtype(ACCOUNT_SIZE)

    def _set_size(self, size: int) -> None:
        self.line_tail = line_tail(size)
        self.line_tail_row: U8Array = np.frombuffer(self.line_tail, dtype=np.uint8)
        self.frame_tail_row: U8Array = np.frombuffer(frame_tail(ACCOUNT_SIZE), dtype=np.uint8)
        self.pad_checked = min(PAD_CHECKED, size - MIN_LINE)  # from the start of the padding

    def _connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._set_size(msg["size"])
        reply = super()._connect(msg)
        self.dtype = frame_dtype(ACCOUNT_SIZE)
        return reply

    def _close_clients(self) -> None:
        self._goodbye()
        super()._close_clients()
        self.names = {}

    def _goodbye(self) -> None:
        """Half-close every client, then read until the server closes it: the others' leave
        notices are read, so nothing is left unread (a close would reset the connection, a
        warning in the server's log) and the server's ``bytes_out`` is what the clients read."""
        live = {c.sock.fileno(): c for c in self.clients if c.sock.fileno() >= 0}
        for client in live.values():
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._lost(client)
        live = {fd: c for fd, c in live.items() if c.sock.fileno() >= 0}
        deadline = time.monotonic() + GOODBYE_TIMEOUT
        while live and time.monotonic() < deadline:
            for key, _mask in self.sel.select(0.1):
                client = key.data
                if client is None or key.fd not in live:
                    continue  # the control pipe: the parent waits for this command's answer
                try:
                    got = client.sock.recv_into(self.rbuf)
                except BlockingIOError:
                    continue
                except OSError:
                    got = 0
                if not got:
                    del live[key.fd]
                    self.sel.unregister(client.sock)
                    client.sock.close()

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self.notices = {}
        self.notice_samples = []
        self.garbled_lines = 0
        self.garbled_samples = []
        self.senders = set()
        self.prefix_mismatch = 0

    def _stats(self) -> dict[str, Any]:
        stats = super()._stats()
        for row in stats["streams"]:
            row.append(self.names.get(row[0], b"").decode(errors="replace"))
        stats["notices"] = self.notices
        stats["notice_samples"] = self.notice_samples
        stats["garbled_lines"] = self.garbled_lines
        stats["garbled_samples"] = self.garbled_samples
        stats["senders"] = sorted([name.decode(errors="replace"), gid]
                                  for name, gid in self.senders)
        stats["prefix_mismatch"] = self.prefix_mismatch
        return stats

    # -- sending: frames as lines ----------------------------------------------------------------

    def _send(self, client: Client, data: bytes) -> None:
        super()._send(client, self._as_lines(data))

    def _as_lines(self, frames: bytes) -> bytes:
        """loadgen's frames (``size`` bytes each) as lines of the same size."""
        size = self.size
        if len(frames) == size:  # paced: one at a time
            return frames[:HEADER.size].hex().encode() + self.line_tail
        n = len(frames) // size  # a burst's batch
        heads = np.frombuffer(frames, dtype=np.uint8).reshape(n, size)[:, :HEADER.size]
        lines = np.empty((n, size), dtype=np.uint8)
        lines[:, :HEX] = np.frombuffer(heads.tobytes().hex().encode(),
                                       dtype=np.uint8).reshape(n, HEX)
        lines[:, HEX:] = self.line_tail_row
        return lines.tobytes()

    # -- receiving: lines back into frames -------------------------------------------------------

    def _read(self, client: Client) -> None:
        read = self._recv(client)
        if read is None:
            return
        data, now = read
        cut = data.rfind(b"\n") + 1
        client.rest = data[cut:]
        if len(client.rest) > MAX_REST:
            self._garbled(client.rest)
            client.rest = b""
        if not cut:
            return
        lines = data[:cut] if cut < len(data) else data
        if lines.startswith(NOTICE) or b"\n" + NOTICE in lines:  # rare: joins, leaves, welcome
            lines = self._notices(client, lines)
            if not lines:
                return
        count = lines.count(b"\n")
        self.acc_chunks.append(lines)
        self.acc_owners.append(client.index)
        self.acc_times.append(now)
        self.acc_counts.append(count)
        self.acc_frames += count

    def _notices(self, client: Client, lines: bytes) -> bytes:
        """Take the server's notices out of ``lines`` (whole lines); return the rest."""
        kept: list[bytes] = []
        for line in lines.split(b"\n")[:-1]:
            if not line.startswith(NOTICE):
                kept.append(line + b"\n")
                continue
            welcome = WELCOME.match(line)
            if welcome:
                self.names[client.gid] = welcome[1]
                kind = "welcome"
            elif line.endswith(b" joined"):
                kind = "joined"
            elif line.endswith(b" left"):
                kind = "left"
            else:
                kind = "other"
            self.notices[kind] = self.notices.get(kind, 0) + 1
            if len(self.notice_samples) < 5:
                self.notice_samples.append(line[:120].decode(errors="replace"))
        return b"".join(kept)

    def _garbled(self, text: bytes, lines: int = 1) -> None:
        self.garbled_lines += lines
        self.garbled_bytes += len(text)
        if len(self.garbled_samples) < 5:
            self.garbled_samples.append(text[:120].decode(errors="replace"))

    def _account(self) -> None:
        """The message lines read since the last call back into loadgen's frames, chunk by
        chunk (numpy: a line's text is the ``size`` bytes before its newline, whatever its
        prefix), then loadgen's accounting."""
        chunks, size = self.acc_chunks, self.size
        text = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        arr = np.frombuffer(text, dtype=np.uint8)
        ends = np.flatnonzero(arr == NL)  # every chunk is whole lines
        starts = np.zeros_like(ends)
        starts[1:] = ends[:-1] + 1
        plen = ends + 1 - starts - size  # "<name> "
        space = np.maximum(ends - size, 0)
        ok = ((plen > PREFIX_BYTES) & (plen <= PREFIX_BYTES + NAME_MAX) & (arr[starts] == LT)
              & (arr[space] == SP) & (arr[np.maximum(space - 1, 0)] == GT))
        at = ends[ok] - (size - 1)  # where each line's own text starts
        hexes = windows(arr, HEX)[at]  # rows gathered from a view: a copy of those bytes only
        tails = windows(arr, len(LINE_END))[at + (size - len(LINE_END))]
        pads = windows(arr, self.pad_checked)[at + HEX] if self.pad_checked else tails[:, :0]
        good = np.ones(len(at), dtype=bool)
        if not ((tails == END).all() and (pads == DOT).all()):  # rare: which lines?
            good = (tails == END).all(axis=1) & (pads == DOT).all(axis=1)
        try:
            heads = np.frombuffer(bytes.fromhex(hexes.tobytes().decode()),
                                  dtype=np.uint8).reshape(len(at), HEADER.size)
        except (UnicodeDecodeError, ValueError):  # rare: which lines have other bytes there?
            digits = HEXVAL[hexes]
            good &= (digits >= 0).all(axis=1)
            heads = (digits[:, 0::2] * 16 + digits[:, 1::2]).astype(np.uint8)
        if not (heads[:, :4] == MAGIC_ROW).all():  # rare: not a frame of ours
            good &= (heads[:, :4] == MAGIC_ROW).all(axis=1)
        ok[ok] = good
        if not good.all():
            heads = heads[good]
        if not ok.all():  # rare: lines not in the format sent
            for i in np.flatnonzero(~ok)[:5].tolist():
                self._garbled(text[starts[i]:ends[i] + 1], 0)
            self.garbled_lines += int((~ok).sum())
            self.garbled_bytes += int((ends - starts + 1)[~ok].sum())
        self._senders(text, heads, np.flatnonzero(ok), starts, ends)
        bounds = np.cumsum([len(c) for c in chunks])
        counts = np.bincount(np.searchsorted(bounds, ends[ok], side="right"),
                             minlength=len(chunks)).tolist()
        keep = [i for i, c in enumerate(counts) if c]
        n = len(heads)
        frames = np.empty((n, ACCOUNT_SIZE), dtype=np.uint8)
        frames[:, :HEADER.size] = heads
        frames[:, HEADER.size:] = self.frame_tail_row
        blob = frames.tobytes()
        cuts: list[int] = (np.cumsum([counts[i] for i in keep], dtype=np.int64)
                           * ACCOUNT_SIZE).tolist()
        self.acc_chunks = [blob[a:b] for a, b in pairwise([0, *cuts])]
        self.acc_owners = [self.acc_owners[i] for i in keep]
        self.acc_times = [self.acc_times[i] for i in keep]
        self.acc_counts = [counts[i] for i in keep]
        self.acc_frames = n
        if n:
            super()._account()

    def _senders(self, text: bytes, heads: U8Array, lines: I64Array, starts: I64Array,
                 ends: I64Array) -> None:
        """The names on this step's lines: every sender's prefix the same length on every
        line, and its name (taken from one line of each sender per batch) recorded."""
        step = heads[:, 4:8].copy().view("<u4").ravel()
        current = step == self.step
        if not current.any():
            return
        senders = heads[current, 8:12].copy().view("<u4").ravel()
        lines = lines[current]
        plen = ends[lines] + 1 - starts[lines] - self.size
        unique, first, inverse = np.unique(senders, return_index=True, return_inverse=True)
        self.prefix_mismatch += int((plen != plen[first][inverse]).sum())
        for sender, i in zip(unique.tolist(), lines[first].tolist(), strict=True):
            self.senders.add((text[starts[i] + 1:ends[i] - self.size - 1], sender))


def chat_worker_main(control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
    raise_nofile()
    ChatWorker(control, wid, lifetime, ca).serve()


# -- what the chat clients received --------------------------------------------------------------


def check_lines(counts: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Client by client: did each receive every line every other client sent, once, each with
    ``<name> `` before it (the sender's name from its welcome line), and nothing else? The keys
    of ``check_bytes``, a delivery being one line to one client, and a few of chat's own."""
    rows = [row for c in counts for row in c["streams"]]  # gid, rx, tx, wire, segs, name
    names: dict[int, str] = {row[0]: row[5] for row in rows}
    lines = {row[0]: row[2] // size for row in rows}
    prefix = {gid: PREFIX_BYTES + len(name.encode()) for gid, name in names.items()}
    sent = sum(row[2] for row in rows)
    received = sum(row[1] for row in rows)
    wire = sum(row[3] for row in rows)
    segs = sum(row[4] for row in rows)
    prefixes = sum(lines[gid] * prefix[gid] for gid in lines)
    short = extra = wrong = 0
    for gid, rx, tx, *_ in rows:
        want = sent - tx + prefixes - lines[gid] * prefix[gid]
        if rx != want:
            wrong += 1
            short += max(0, want - rx)
            extra += max(0, rx - want)
    messages = sum(lines.values())
    expected = sent * (len(rows) - 1) + prefixes * (len(rows) - 1) if rows else 0
    deliveries = messages * (len(rows) - 1) * (received / expected if expected else 0.0)
    errors: list[str] = []
    nameless = sum(1 for name in names.values() if not name)
    if nameless:
        errors.append(f"names: {nameless} clients had no welcome line")
    if len({name.lower() for name in names.values()}) < len(names):
        errors.append("names: the same name twice")
    wrong_names = sum(1 for c in counts for name, gid in c["senders"]
                      if gid in names and names[gid] != name)
    if wrong_names:
        errors.append(f"names: {wrong_names} (receiver, sender) pairs with lines under "
                      "another client's name")
    if any(tx % size for _gid, _rx, tx, *_ in rows):
        errors.append("a client sent part of a line")
    notices: dict[str, int] = {}
    for c in counts:
        for kind, k in c["notices"].items():
            notices[kind] = notices.get(kind, 0) + k
    if notices:
        samples = [s for c in counts for s in c["notice_samples"]][:3]
        errors.append(f"notices during the turn: {notices}, such as {samples}")
    mismatch = sum(int(c["prefix_mismatch"]) for c in counts)
    if mismatch:
        errors.append(f"names: {mismatch} lines with a prefix of another length than their "
                      "sender's other lines")
    garbled = sum(int(c["garbled_lines"]) for c in counts)
    if garbled:
        samples = [s for c in counts for s in c["garbled_samples"]][:3]
        errors.append(f"{garbled} lines not in the format sent, such as {samples}")
    return {"bytes_sent": sent, "bytes_received": received, "bytes_expected": expected,
            "clients_wrong": wrong, "bytes_short": short, "bytes_extra": extra,
            "messages": messages, "deliveries": deliveries,
            "wire_bytes_received": wire, "segments_received": segs,
            "wire_per_delivery": wire / deliveries if deliveries else None,
            "segments_per_delivery": segs / deliveries if deliveries else None,
            "split_frames": garbled,
            "gen_cpu_s": sum(float(c["cpu"]) for c in counts),
            "prefix_bytes_per_delivery": prefixes / messages if messages else None,
            "check_errors": errors}


# -- the servers ---------------------------------------------------------------------------------


def server_argv(config: str, history: int, max_line: int) -> list[str]:
    argv = fsmchat("--port", "0", "--log-level", "info", "--drain-timeout", "2",
                   "--mode", "raw" if config == "raw" else "chat")
    if config != "raw" and max_line > DEFAULT_MAX_LINE:
        argv += ["--max-line", str(max_line)]
    if config == "history":
        argv += ["--history", str(history)]
    return argv


def finish_chat(run: Run, srv: Server) -> None:
    """``finish_run`` (the server's totals against the clients'), and the mode."""
    finish_run(run, srv)
    want = "raw" if run.config == "raw" else "chat"
    mode = str(srv.started.get("mode", ""))
    if mode != want:
        run.errors.append(f"server.started says mode {mode!r}, not {want!r}")


# -- main ----------------------------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history", type=int, default=100, metavar="N",
                        help="also runs with --mode chat --history N; 0: none (default: 100)")
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT, metavar="S",
                        help="seconds a step may take to deliver what was sent (a burst: after "
                             "its own seconds) before it fails (default: %(default)g)")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(
        args_list, description="fsmchat: server CPU per delivered message in chat mode "
        "against raw mode", min_size=MIN_LINE, extend=add_options)
    if args.history < 0:
        usage_error("chat", "--history must be 0 or more")
    prof = replace(prof, drain_timeout=args.drain_timeout)
    configs = ("raw", "chat", "history") if args.history else ("raw", "chat")
    labels = {"raw": "raw", "chat": "chat", "history": f"chat+h{args.history}"}
    max_line = max(w.size for w in workloads) - 1  # the newline is not part of the line
    session = Session("chat", args, args_list, logdir=args.logdir)
    argvs = {c: server_argv(c, args.history, max_line) for c in configs}

    def body() -> int:
        # Forked before any thread. The chat and the history runs share one (a connect starts
        # afresh).
        with sigint_ignored():
            raw_gen = Generator(None, args.procs, name="chat-bench-raw")
            chat_gen = Generator(None, args.procs, target=chat_worker_main,
                                 name="chat-bench-chat")
        try:
            def one(config: str, repeat: int) -> Run:
                raw = config == "raw"
                return one_run(raw_gen if raw else chat_gen, config, repeat, argv=argvs[config],
                               workloads=workloads, prof=prof, session=session, labels=labels,
                               check=check_bytes if raw else check_lines, finish=finish_chat)

            runs = alternate(configs, prof, one)
        finally:
            raw_gen.close()
            chat_gen.close()
        received = {c: "every line every other client sent, after its sender's name"
                    for c in configs[1:]}
        return report(session, runs, workloads, configs, labels=labels, prof=prof,
                      received=received,
                      server_commands={c: " ".join(a[1:]) for c, a in argvs.items()})

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
