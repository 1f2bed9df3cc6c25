"""History kept on disk for a standalone server (``--history-file FILE``), across restarts.

The server loads the records at the start, appends each message it keeps, writes what it
appended once per loop turn (``flush``: one ``os.write`` to a regular file, no fsync), and now
and then rewrites the file with only what its history still holds (``compact``), so that the
file stays within about twice that. A crash can tear the last write: what is torn is skipped on
reading and cut off before the next write, never fatal.

The file (``FORMAT`` is its version)::

    fsmchat-history 1 3f2a9c0d1e4b5a69 41\\n    magic, version, epoch (16 hex digits), last seq
    r 0000002a 8d3b7f10\\n                      a record: body length and CRC32, 8 hex each
    <body: length bytes>\\n                     the body, then a newline
    r ...

    body = b"<said_ms> <stream length> <msg_id length>\\n" + stream + msg_id + data

Every number is ASCII; stream, id and data are any bytes (newlines included): the lengths say
where each ends, and the CRC32 (of the body) tells a whole record from a torn or damaged one.
The epoch is drawn when the file is made and kept by every rewrite: the origin of message ids
(``<epoch>-<seq>``) standalone. So that a restart goes on with new ids, never one already
given, ``last_seq`` is the highest seq of the epoch's ids the file has seen: in its records, or
in the header, where a rewrite keeps it even when no record of it is left.

Rules it keeps:
- A file that is not ours (another magic, another version, a directory, not a regular file,
  one another process holds) is refused with ``HistoryFileError``: one line for people, saying
  what the file is and what to do. A missing file is made (its directory must exist), and so is
  an empty one, mode 0600: it holds chat content. Two servers never share one file (``flock``).
- A record whose frame does not parse, or whose CRC or body is wrong, is skipped, and reading
  goes on at the next frame (the next ``\\nr ``) whose CRC checks: what comes after a damaged
  record is kept; what follows the last whole record (a torn tail) is skipped. Either way
  ``skipped_bytes`` and ``skipped_records`` (runs of damage) say how much, for a warning; the
  next write first cuts the file back to the end of its last whole record, so what follows is
  readable.
- A rewrite is atomic: a temporary file in the same directory, fsynced, then ``os.replace``
  (and the directory fsynced). If it fails, the old file is intact and still in use.
- ``limit_bytes`` is a hard cap on the records a rewrite keeps: the newest that fit.
- A write that fails (disk full) cuts the file back to where the write began and drops that
  turn's records (the history in memory still has them; the next rewrite puts them back).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["COMPACT_FLOOR", "FORMAT", "MAGIC", "HistoryFile", "HistoryFileError", "Record",
           "encode"]

MAGIC = b"fsmchat-history"
FORMAT = 1

COMPACT_FLOOR = 64 * 1024
"""A file smaller than this is never rewritten, however little of it is live: rewriting a small
file often would cost more than the bytes it saves."""

_HEADER = re.compile(rb"fsmchat-history (0|[1-9][0-9]{0,8}) ([0-9a-f]{16}) (0|[1-9][0-9]{0,18})\n")
_HEADER_MAX = 64  # the longest first line read for a header
_SEQ_DIGITS = 19
_FRAME = re.compile(rb"r ([0-9a-f]{8}) ([0-9a-f]{8})\n")
_FRAME_SIZE = 20  # len(b"r 0000002a 8d3b7f10\n")
_META = re.compile(rb"(0|[1-9][0-9]{0,18}) (0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9})\n")
_META_MAX = 42  # said_ms, two lengths, two spaces and the newline at most
_BODY_MAX = 0xFFFFFFFF
_SAID_MAX = 10**19 - 1


class HistoryFileError(Exception):
    """The history file cannot be used, or a write to it failed: one line for people."""


@dataclass(frozen=True, slots=True)
class Record:
    """One message of the history: its room (``b""`` in raw mode), its id, when, its bytes."""

    stream: bytes
    msg_id: bytes
    said_ms: int  # Unix time, in milliseconds
    data: bytes


def encode(record: Record) -> bytes:
    """The record as the file holds it (frame, body, newline); ValueError if it cannot be."""
    if not 0 <= record.said_ms <= _SAID_MAX:
        raise ValueError(f"said_ms out of range: {record.said_ms}")
    body = b"%d %d %d\n%b%b%b" % (record.said_ms, len(record.stream), len(record.msg_id),
                                  record.stream, record.msg_id, record.data)
    if len(body) > _BODY_MAX:
        raise ValueError(f"record too large: {len(body)} bytes")
    return b"r %08x %08x\n%b\n" % (len(body), zlib.crc32(body), body)


def _decode(body: bytes) -> Record | None:
    """The record a body holds (its CRC already checked), or None if it is not one."""
    newline = body.find(b"\n", 0, _META_MAX)
    meta = _META.fullmatch(body, 0, newline + 1) if newline >= 0 else None
    if meta is None:
        return None
    said, stream_len, id_len = (int(group) for group in meta.groups())
    start = newline + 1
    if start + stream_len + id_len > len(body):
        return None
    id_start = start + stream_len
    data_start = id_start + id_len
    return Record(body[start:id_start], body[id_start:data_start], said, body[data_start:])


@dataclass(frozen=True, slots=True)
class _Scan:
    """What reading the records after the header found."""

    records: list[Record]
    good_end: int  # the offset just past the last whole record (the header's end if none)
    skipped_bytes: int
    skipped_records: int  # damaged records skipped, and the torn tail (if any) as one


def _scan(content: bytes, start: int) -> _Scan:
    records: list[Record] = []
    offset = good_end = start
    skipped_bytes = skipped_records = 0
    damaged = False  # in a run of damage (counted once) since the last whole record
    size = len(content)
    while offset < size:
        frame = _FRAME.fullmatch(content, offset, offset + _FRAME_SIZE)
        end = -1
        if frame is not None:
            length, crc = int(frame[1], 16), int(frame[2], 16)
            body_start = offset + _FRAME_SIZE
            end = body_start + length + 1
            if end > size or content[end - 1] != 0x0A:
                end = -1
        record = None
        if end >= 0:
            body = content[body_start:end - 1]
            record = _decode(body) if zlib.crc32(body) == crc else None
        if record is not None:
            records.append(record)
            good_end = offset = end
            damaged = False
            continue
        skipped_records += not damaged
        damaged = True
        # Damaged here: reading goes on at the next frame, if any (a CRC tells a real one).
        following = content.find(b"\nr ", offset) + 1 if end < 0 else end
        if following <= 0:
            skipped_bytes += size - offset
            break
        skipped_bytes += following - offset
        offset = following
    return _Scan(records, good_end, skipped_bytes, skipped_records)


def _describe(start: bytes) -> str:
    """What a file that is not ours seems to hold, from its first bytes, for the refusal."""
    if start.startswith(MAGIC + b" "):
        version = start[len(MAGIC) + 1:].split(b" ", 1)[0]
        if version.isdigit() and int(version) != FORMAT:
            return (f"a history file of another fsmchat version (format {int(version)}; this "
                    f"one reads format {FORMAT})")
        return "a history file whose first line is damaged"
    sample = start[:16]
    try:
        text = sample.split(b"\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable():
        return f"not an fsmchat history file: it starts with the text {text!r}"
    return f"not an fsmchat history file: it starts with the bytes {sample.hex(' ')}"


class HistoryFile:
    """An open history file: its records, what waits to be written, its size and epoch."""

    __slots__ = ("_buffer", "_fd", "_id_prefix", "_loaded", "_pending", "_since", "_tail_at",
                 "epoch",
                 "header_size", "last_seq", "limit_bytes", "path", "size", "skipped_bytes",
                 "skipped_records")

    def __init__(self, path: str, fd: int, *, epoch: bytes, header_size: int, size: int,
                 limit_bytes: int, last_seq: int) -> None:
        self.path = path  # the path given, for messages
        self._fd = fd
        self.epoch = epoch  # 16 hex digits, as bytes: the origin of message ids
        self._id_prefix = epoch + b"-"
        self.last_seq = last_seq  # the highest seq of an id <epoch>-<seq> seen; 0: none
        self.header_size = header_size
        self.size = size  # bytes in the file, once what is buffered is written
        self.limit_bytes = limit_bytes
        self.skipped_bytes = 0
        self.skipped_records = 0
        self._buffer: list[bytes] = []
        self._pending = 0
        self._tail_at: int | None = None  # where to cut a torn tail before the next write
        self._since = header_size  # the size after the last rewrite (the header: none yet)
        self._loaded: list[Record] | None = None  # what open read, until the file changes

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, limit_bytes: int) -> HistoryFile:
        """The history file at ``path``, made if missing or empty; HistoryFileError if not ours."""
        real = os.path.realpath(path)
        try:
            fd = os.open(real, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return cls._create(path, real, limit_bytes, replace=False)
        except IsADirectoryError:
            raise HistoryFileError(f"{path} is a directory: give --history-file the path of a "
                                   "file in it (made if missing)") from None
        except OSError as exc:
            raise HistoryFileError(f"cannot open the history file {path} for reading and "
                                   f"writing: {exc.strerror or exc}") from None
        try:
            return cls._existing(path, real, fd, limit_bytes)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _existing(cls, path: str, real: str, fd: int, limit_bytes: int) -> HistoryFile:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise HistoryFileError(f"{path} is not a regular file: give --history-file the path "
                                   "of a file (made if missing)")
        os.set_blocking(fd, True)
        _lock(fd, path)
        try:
            current = os.stat(real).st_ino
        except OSError:
            current = -1
        if current != os.fstat(fd).st_ino:  # rewritten by another server while we locked
            raise HistoryFileError(_IN_USE.format(path))
        content = _read_all(fd, path)
        if not content:  # made but never written (a crash at once): as good as missing
            fresh = cls._create(path, real, limit_bytes, replace=True)
            os.close(fd)
            return fresh
        header = _HEADER.match(content, 0, _HEADER_MAX)
        if header is None or int(header[1]) != FORMAT:
            raise HistoryFileError(f"{path} is {_describe(content[:_HEADER_MAX])}: give "
                                   "--history-file another path, or move this file away")
        scan = _scan(content, header.end())
        history = cls(path, fd, epoch=header[2], header_size=header.end(), size=len(content),
                      limit_bytes=limit_bytes, last_seq=int(header[3]))
        for record in scan.records:
            history._saw(record.msg_id)
        history._loaded = scan.records
        history.skipped_bytes = scan.skipped_bytes
        history.skipped_records = scan.skipped_records
        if scan.good_end < len(content):
            history._tail_at = scan.good_end
        return history

    @classmethod
    def _create(cls, path: str, real: str, limit_bytes: int, *,
                replace: bool) -> HistoryFile:
        epoch = secrets.token_hex(8).encode()
        header = _header(epoch, 0)
        fd = _write_new(path, real, header, replace=replace)
        return cls(path, fd, epoch=epoch, header_size=len(header), size=len(header),
                   limit_bytes=limit_bytes, last_seq=0)

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> list[Record]:
        """Every whole record in the file, oldest first (what is buffered not included).

        Updates ``skipped_bytes`` and ``skipped_records`` with what this reading skipped."""
        if self._loaded is not None:  # the file is as open read it (no other writer: the lock)
            records, self._loaded = self._loaded, None
            return records
        content = _read_all(self._fd, self.path)
        scan = _scan(content, self.header_size)
        self.skipped_bytes = scan.skipped_bytes
        self.skipped_records = scan.skipped_records
        return scan.records

    # -- writing ---------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Keep ``record`` for the next ``flush``; ValueError if it cannot be written."""
        data = encode(record)
        self._buffer.append(data)
        self._pending += len(data)
        self._saw(record.msg_id)

    def _saw(self, msg_id: bytes) -> None:
        """Keeps ``last_seq`` up with an id of this file's epoch."""
        if msg_id.startswith(self._id_prefix):
            seq = msg_id[len(self._id_prefix):]
            if seq.isdigit() and len(seq) <= _SEQ_DIGITS and int(seq) > self.last_seq:
                self.last_seq = int(seq)

    @property
    def pending(self) -> int:
        """Bytes appended and not yet written."""
        return self._pending

    def flush(self) -> None:
        """Write what was appended, with one ``os.write``; HistoryFileError if it failed (those
        records are then dropped, and the file cut back to where it was)."""
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._loaded = None
        self._pending = 0
        start = self.size if self._tail_at is None else self._tail_at
        try:
            if self._tail_at is not None:
                os.ftruncate(self._fd, self._tail_at)
                self._tail_at = None
                self.size = start
            written = os.write(self._fd, data)
            while written < len(data):  # a regular file writes it all, or fails on the rest
                written += os.write(self._fd, memoryview(data)[written:])
        except OSError as exc:
            self._cut_back(start)
            raise HistoryFileError(f"cannot write to the history file {self.path}: "
                                   f"{exc.strerror or exc}; {len(data)} bytes of history not "
                                   "kept there") from None
        self.size = start + len(data)

    def _cut_back(self, size: int) -> None:
        """After a failed write: the file as it was before it, or cut there at the next one."""
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            self._tail_at = size
        else:
            self.size = size

    def sync(self) -> None:
        """Flush, then fsync: for the stop, so that what was said survives a power cut too."""
        self.flush()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise HistoryFileError(f"cannot sync the history file {self.path}: "
                                   f"{exc.strerror or exc}") from None

    # -- staying small ---------------------------------------------------------------------

    def needs_compaction(self, live_bytes: int) -> bool:
        """Whether the file grew past twice what is live, and so should be rewritten.

        ``live_bytes`` is what the history still holds (its messages' bytes). The file may
        grow to twice that, or to twice what the last rewrite wrote (that counts the records'
        framing), whichever is more, and never needs rewriting under ``COMPACT_FLOOR``."""
        live = min(live_bytes, self.limit_bytes)
        return self.size + self._pending > max(2 * live, 2 * self._since, COMPACT_FLOOR)

    def compact(self, live: Iterable[Record]) -> list[Record]:
        """Rewrite the file atomically with only ``live`` (oldest first), the newest that fit
        in ``limit_bytes``; what was buffered and not in ``live`` is dropped. Returns the records
        kept. HistoryFileError if the rewrite failed: the old file is then intact, and in use."""
        encoded = [(record, encode(record)) for record in live]
        kept = 0
        total = 0
        for _, data in reversed(encoded):
            if total + len(data) > self.limit_bytes:
                break
            total += len(data)
            kept += 1
        chosen = encoded[len(encoded) - kept:]
        header = _header(self.epoch, self.last_seq)
        content = b"".join((header, *(data for _, data in chosen)))
        fd = _write_new(self.path, os.path.realpath(self.path), content)
        os.close(self._fd)  # its lock goes with it; the new file's is already held
        self._fd = fd
        self._buffer.clear()
        self._pending = 0
        self._tail_at = None
        self._loaded = None
        self.size = self._since = len(content)
        self.header_size = len(header)
        return [record for record, _ in chosen]

    def close(self) -> None:
        """Let the file go (what is buffered and not flushed is lost)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> HistoryFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_IN_USE = "{} is in use by another fsmchat: give each server a --history-file of its own"


def _header(epoch: bytes, last_seq: int) -> bytes:
    return b"%b %d %b %d\n" % (MAGIC, FORMAT, epoch, last_seq)


def _lock(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise HistoryFileError(_IN_USE.format(path)) from None
    except OSError as exc:
        raise HistoryFileError(f"cannot lock the history file {path}: "
                               f"{exc.strerror or exc}") from None


def _read_all(fd: int, path: str) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    try:
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as exc:
        raise HistoryFileError(f"cannot read the history file {path}: "
                               f"{exc.strerror or exc}") from None
    return b"".join(chunks)


def _write_new(path: str, real: str, content: bytes, *, replace: bool = True) -> int:
    """Put ``content`` at ``real`` atomically, mode 0600; the new file's descriptor, locked.

    Without ``replace``, only where there is no file yet: two servers that make the same
    missing file at once do not both think it theirs."""
    directory, name = os.path.split(real)
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        hint = " (its directory must exist)" if isinstance(exc, FileNotFoundError) else ""
        raise HistoryFileError(f"cannot write the history file {path}: "
                               f"{exc.strerror or exc}{hint}") from None
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        written = 0
        while written < len(content):
            written += os.write(fd, memoryview(content)[written:])
        os.fsync(fd)
        if replace:
            os.replace(temp, real)
        else:
            os.link(temp, real)
            os.unlink(temp)
    except FileExistsError:
        _discard(fd, temp)
        raise HistoryFileError(_IN_USE.format(path)) from None
    except OSError as exc:
        _discard(fd, temp)
        raise HistoryFileError(f"cannot write the history file {path}: "
                               f"{exc.strerror or exc}") from None
    _sync_directory(directory)
    return fd


def _discard(fd: int, temp: str) -> None:
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(temp)


def _sync_directory(directory: str) -> None:
    """So that the rename survives a crash too (best effort: not every system allows it)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
