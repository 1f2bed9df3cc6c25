"""The history file (``fsmchat/history_file.py``) on real files, and ``--history-file``'s rules.

Every test reads and writes real files in its own directory. Failures of the disk are made for
real: a file size limit (``RLIMIT_FSIZE``, which binds root too) for a full disk, and a
read-only directory or file for a process without ``CAP_DAC_OVERRIDE`` (as root, the check runs
in a child started by ``setpriv`` without it).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HOST, run_cli, usage_error
from hypothesis import given, settings
from hypothesis import strategies as st

from fsmchat.history_file import (
    COMPACT_FLOOR,
    HistoryFile,
    HistoryFileError,
    Record,
    encode,
)
from fsmchat.options import UsageError, build, read_config

LIMIT = 1 << 20

AWKWARD = [
    Record(b"", b"", 0, b""),
    Record(b"lobby", b"3f2a9c0d1e4b5a69-1", 1764700000000, b"<alice> hi\n"),
    Record(b"r\nx 1 2\n", b"-\n", 1, b"two\nlines\n\x00\xff\r\n"),
    Record(b"\xff\xfe", b"", 10**19 - 1, b"r 00000000 00000000\n" * 3),
    Record(b"", b"id", 5, bytes(range(256)) * 4),
]


def make(path: Path, records: list[Record]) -> bytes:
    """A history file at ``path`` holding ``records``; its content."""
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        for record in records:
            history.append(record)
        history.flush()
    return path.read_bytes()


def reopened(path: Path) -> list[Record]:
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        return history.records()


def one_line(exc: pytest.ExceptionInfo[HistoryFileError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


# -- round trips ------------------------------------------------------------------------------


def test_awkward_records_come_back_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "history"
    make(path, AWKWARD)
    assert reopened(path) == AWKWARD


@settings(max_examples=200, deadline=None)
@given(st.lists(st.builds(Record, st.binary(max_size=20), st.binary(max_size=30),
                          st.integers(0, 10**19 - 1), st.binary(max_size=300)),
                max_size=12),
       st.integers(1, 4))
def test_any_records_come_back_in_order_however_they_were_flushed(
    records: list[Record], turns: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "history"
        with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
            for index, record in enumerate(records):
                history.append(record)
                if index % turns == 0:
                    history.flush()
            history.flush()
            assert history.records() == records
            assert history.size == path.stat().st_size
        assert reopened(path) == records


def test_a_new_file_has_the_header_a_fresh_epoch_and_mode_0600(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with HistoryFile.open(str(tmp_path / "a"), limit_bytes=LIMIT) as a:
            epoch = a.epoch
    finally:
        os.umask(old)
    with HistoryFile.open(str(tmp_path / "b"), limit_bytes=LIMIT) as b:
        assert b.epoch != epoch
    assert len(epoch) == 16 and int(epoch, 16) >= 0 and epoch == epoch.lower()
    assert (tmp_path / "a").read_bytes() == b"fsmchat-history 1 " + epoch + b" 0\n"
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600
    with HistoryFile.open(str(tmp_path / "a"), limit_bytes=LIMIT) as again:
        assert again.epoch == epoch
        assert again.records() == [] and again.skipped_bytes == 0


def test_what_is_appended_reaches_the_file_only_at_flush(tmp_path: Path) -> None:
    path = tmp_path / "history"
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        empty = path.stat().st_size
        history.append(AWKWARD[1])
        assert history.pending == len(encode(AWKWARD[1]))
        assert path.stat().st_size == empty and history.records() == []
        history.flush()
        assert history.pending == 0
        assert history.records() == [AWKWARD[1]]
        history.sync()
    assert reopened(path) == [AWKWARD[1]]


def test_an_empty_file_is_taken_as_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "history"
    path.write_bytes(b"")
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.records() == []
        assert path.read_bytes() == b"fsmchat-history 1 " + history.epoch + b" 0\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_is_followed_and_stays_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    make(real, AWKWARD[:2])
    link = tmp_path / "link"
    link.symlink_to(real)
    with HistoryFile.open(str(link), limit_bytes=LIMIT) as history:
        history.compact(AWKWARD[1:2])
    assert link.is_symlink()
    assert reopened(real) == AWKWARD[1:2]


def test_last_seq_follows_the_epochs_ids_and_outlives_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "history"
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        epoch = history.epoch
        assert history.last_seq == 0
        for msg_id in (b"%b-3" % epoch, b"%b-41" % epoch, b"%b-7" % epoch,
                       b"0000000000000000-99", b"%b-" % epoch, b"%b-x1" % epoch,
                       b"%b-%d" % (epoch, 10**20), b"%b41" % epoch):
            history.append(Record(b"lobby", msg_id, 1, b"m"))
        assert history.last_seq == 41
        history.flush()
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.last_seq == 41
        history.compact([])  # nothing of it left but the header
    assert path.read_bytes() == b"fsmchat-history 1 " + epoch + b" 41\n"
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.last_seq == 41 and history.records() == []


# -- torn and damaged records -----------------------------------------------------------------


def three(tmp_path: Path) -> tuple[bytes, int]:
    """A file of AWKWARD[1:4] and the offset where its last record starts."""
    content = make(tmp_path / "whole", AWKWARD[1:4])
    return content, len(content) - len(encode(AWKWARD[3]))


def test_a_last_record_torn_anywhere_is_skipped_and_cut_at_the_next_write(
    tmp_path: Path,
) -> None:
    content, last = three(tmp_path)
    path = tmp_path / "history"
    for cut in range(last, len(content)):
        path.write_bytes(content[:cut])
        with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
            for _ in range(2):  # what open read, then the file read again
                assert history.records() == AWKWARD[1:3], cut
                assert history.skipped_bytes == cut - last
                assert history.skipped_records == (1 if cut > last else 0)
            history.append(AWKWARD[4])
            history.flush()
            assert history.size == path.stat().st_size == last + len(encode(AWKWARD[4]))
        with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
            assert history.records() == [*AWKWARD[1:3], AWKWARD[4]], cut
            assert history.skipped_bytes == 0


def test_a_flipped_byte_anywhere_in_the_last_record_loses_that_record_only(
    tmp_path: Path,
) -> None:
    content, last = three(tmp_path)
    path = tmp_path / "history"
    for offset in range(last, len(content)):
        damaged = bytearray(content)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
            assert history.records() == AWKWARD[1:3], offset
            assert history.skipped_bytes == len(content) - last, offset
            assert history.skipped_records >= 1
            history.append(AWKWARD[0])
            history.flush()
        assert reopened(path) == [*AWKWARD[1:3], AWKWARD[0]], offset


def test_a_damaged_record_in_the_middle_is_skipped_alone(tmp_path: Path) -> None:
    content, _ = three(tmp_path)
    start = content.index(encode(AWKWARD[2]))
    data_at = start + len(encode(AWKWARD[2])) - 3  # inside its data, its frame intact
    damaged = bytearray(content)
    damaged[data_at] ^= 0x40
    path = tmp_path / "history"
    path.write_bytes(bytes(damaged))
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.records() == [AWKWARD[1], AWKWARD[3]]
        assert history.skipped_bytes == len(encode(AWKWARD[2]))
        assert history.skipped_records == 1


def test_a_file_of_only_a_header_and_garbage_keeps_its_epoch(tmp_path: Path) -> None:
    path = tmp_path / "history"
    epoch = b"0123456789abcdef"
    path.write_bytes(b"fsmchat-history 1 " + epoch + b" 7\n\x00\x00\x00\x00")
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.epoch == epoch
        assert history.records() == [] and history.skipped_bytes == 4
        assert history.last_seq == 7


# -- files that are not ours ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"hello world\nthis is my notes file\n", "'hello world'"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "89 50 4e 47"),
        (b"\x00" * 100, "00 00 00"),
        (b"fsmchat-history 2 0123456789abcdef 0\n", "format 2"),
        (b"fsmchat-history 1 XYZ 0\n", "damaged"),
        (b"fsmchat-history 01 0123456789abcdef 0\n", "damaged"),
        (b"fsmchat-hist", "'fsmchat-hist'"),
    ],
    ids=["text", "png", "zeros", "another-version", "bad-header", "bad-version", "short"],
)
def test_a_file_that_is_not_ours_is_refused_in_one_line_and_left_alone(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "notes"
    path.write_bytes(content)
    with pytest.raises(HistoryFileError) as exc:
        HistoryFile.open(str(path), limit_bytes=LIMIT)
    message = one_line(exc)
    assert str(path) in message and says in message, message
    assert "another path" in message
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(HistoryFileError) as exc:
        HistoryFile.open(str(tmp_path), limit_bytes=LIMIT)
    assert "is a directory" in one_line(exc)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(HistoryFileError) as exc:
        HistoryFile.open(str(path), limit_bytes=LIMIT)
    assert "not a regular file" in one_line(exc)


def test_a_missing_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(HistoryFileError) as exc:
        HistoryFile.open(str(tmp_path / "nowhere" / "history"), limit_bytes=LIMIT)
    assert "its directory must exist" in one_line(exc)


def test_a_file_another_server_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history"
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as first:
        with pytest.raises(HistoryFileError) as exc:
            HistoryFile.open(str(path), limit_bytes=LIMIT)
        assert "in use by another fsmchat" in one_line(exc)
        first.compact([AWKWARD[1]])  # the new file is held as well
        with pytest.raises(HistoryFileError):
            HistoryFile.open(str(path), limit_bytes=LIMIT)
    assert reopened(path) == [AWKWARD[1]]


def unprivileged(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` (printing one JSON object) in a child without CAP_DAC_OVERRIDE."""
    command = [sys.executable, "-c", script, *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "running as root, the permission tests need setpriv (util-linux)"
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


OPEN_SCRIPT = """
import json, sys
from fsmchat.history_file import HistoryFile, HistoryFileError
try:
    HistoryFile.open(sys.argv[1], limit_bytes=1 << 20)
    print(json.dumps({"error": None}))
except HistoryFileError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_a_file_that_cannot_be_written_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "history"
    make(path, AWKWARD[:1])
    path.chmod(0o400)
    error = unprivileged(OPEN_SCRIPT, str(path))["error"]
    assert isinstance(error, str) and "\n" not in error
    assert "for reading and writing: Permission denied" in error and str(path) in error


# -- compaction -------------------------------------------------------------------------------


def test_compaction_keeps_the_epoch_and_exactly_the_records_given(tmp_path: Path) -> None:
    path = tmp_path / "history"
    make(path, AWKWARD)
    before = path.stat().st_ino
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        epoch = history.epoch
        history.append(AWKWARD[0])  # buffered, not live: dropped
        kept = history.compact(AWKWARD[2:4])
        assert kept == AWKWARD[2:4]
        expected = b"fsmchat-history 1 " + epoch + b" 0\n" + b"".join(map(encode, AWKWARD[2:4]))
        assert path.read_bytes() == expected and history.size == len(expected)
        assert path.stat().st_ino != before  # a new file put in place, not the old one rewritten
        history.append(AWKWARD[1])
        history.flush()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history"]
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.epoch == epoch
        assert history.records() == [*AWKWARD[2:4], AWKWARD[1]]


def test_compaction_after_a_torn_tail_leaves_no_tail(tmp_path: Path) -> None:
    content, last = three(tmp_path)
    path = tmp_path / "history"
    path.write_bytes(content[:last + 5])
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        history.compact(history.records())
        history.append(AWKWARD[0])
        history.flush()
    assert reopened(path) == [*AWKWARD[1:3], AWKWARD[0]]


def test_compaction_over_the_limit_keeps_the_newest_that_fit(tmp_path: Path) -> None:
    records = [Record(b"room", b"e-%d" % n, n, b"x" * (n * 7 % 50)) for n in range(40)]
    sizes = [len(encode(record)) for record in records]
    limit = sum(sizes[-13:]) + sizes[-14] - 1  # 13 fit, 14 do not
    with HistoryFile.open(str(tmp_path / "history"), limit_bytes=limit) as history:
        assert history.compact(records) == records[-13:]
        assert history.size - history.header_size == sum(sizes[-13:]) <= limit
        assert history.records() == records[-13:]


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes of any file fail with EFBIG (no SIGXFSZ), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_compaction_that_cannot_be_written_leaves_the_old_file_in_use(tmp_path: Path) -> None:
    path = tmp_path / "history"
    content = make(path, AWKWARD[:3])
    big = [Record(b"", b"", 1, b"y" * 5000)]
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        with file_size_limit(len(content) + 100), pytest.raises(HistoryFileError) as exc:
            history.compact(big)
        assert "cannot write the history file" in one_line(exc)
        assert path.read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["history"]  # no temp file left
        history.append(AWKWARD[4])
        history.flush()
    assert reopened(path) == [*AWKWARD[:3], AWKWARD[4]]


COMPACT_SCRIPT = """
import json, sys
from fsmchat.history_file import HistoryFile, HistoryFileError, Record
with HistoryFile.open(sys.argv[1], limit_bytes=1 << 20) as history:
    try:
        history.compact([Record(b"", b"", 1, b"z")])
        error = None
    except HistoryFileError as exc:
        error = str(exc)
    history.append(Record(b"", b"", 2, b"after"))
    history.flush()
print(json.dumps({"error": error}))
"""


def test_a_compaction_in_a_read_only_directory_leaves_the_old_file_in_use(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "history"
    content = make(path, AWKWARD[:2])
    directory.chmod(0o500)
    try:
        error = unprivileged(COMPACT_SCRIPT, str(path))["error"]
    finally:
        directory.chmod(0o700)
    assert isinstance(error, str) and "Permission denied" in error and "\n" not in error
    assert path.read_bytes().startswith(content)
    assert reopened(path) == [*AWKWARD[:2], Record(b"", b"", 2, b"after")]
    assert sorted(p.name for p in directory.iterdir()) == ["history"]


def test_a_write_that_fails_cuts_the_file_back_and_the_next_one_works(tmp_path: Path) -> None:
    path = tmp_path / "history"
    content = make(path, AWKWARD[:2])
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        history.append(Record(b"", b"", 1, b"w" * 5000))
        with file_size_limit(len(content) + 1000), pytest.raises(HistoryFileError) as exc:
            history.flush()
        assert "not kept there" in one_line(exc)
        assert path.read_bytes() == content and history.size == len(content)
        history.append(AWKWARD[2])
        history.flush()
    assert reopened(path) == AWKWARD[:3]


# -- the size bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [200, 3000], ids=["under-the-floor", "over-it"])
def test_the_file_stays_within_twice_the_live_history_as_a_server_uses_it(
    tmp_path: Path, kept: int
) -> None:
    """A server's use: a bounded history, one flush per turn, a rewrite when it is due."""
    path = tmp_path / "history"
    live: deque[Record] = deque()
    live_bytes = encoded_live = written = compactions = 0
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        for turn in range(3 * kept // 5 + 1200):
            for n in range(5):
                record = Record(b"lobby", b"0123456789abcdef-%d" % (turn * 5 + n), turn,
                                b"<bob> message %d\n" % (turn * n))
                live.append(record)
                history.append(record)
                live_bytes += len(record.data)
                encoded_live += len(encode(record))
                written += len(encode(record))
                if len(live) > kept:
                    gone = live.popleft()
                    live_bytes -= len(gone.data)
                    encoded_live -= len(encode(gone))
            history.flush()
            if history.needs_compaction(live_bytes):
                history.compact(live)
                compactions += 1
            assert path.stat().st_size == history.size
            bound = max(2 * (encoded_live + history.header_size), COMPACT_FLOOR)
            assert history.size <= bound + 5 * 60, turn
        assert history.records()[-kept:] == list(live)  # and older ones, not yet rewritten
    assert 1 <= compactions <= written // min(encoded_live, COMPACT_FLOOR // 2)  # no thrashing


def test_a_small_file_is_never_due(tmp_path: Path) -> None:
    with HistoryFile.open(str(tmp_path / "history"), limit_bytes=LIMIT) as history:
        for n in range(100):
            history.append(Record(b"", b"", n, b"m"))
        history.flush()
        assert not history.needs_compaction(0)


def test_a_file_bloated_before_a_restart_is_due_at_once(tmp_path: Path) -> None:
    path = tmp_path / "history"
    records = [Record(b"", b"", n, b"m" * 1000) for n in range(200)]
    make(path, records)
    with HistoryFile.open(str(path), limit_bytes=LIMIT) as history:
        assert history.needs_compaction(10 * 1000)  # the history keeps only 10 of them
        history.compact(history.records()[-10:])
        assert not history.needs_compaction(10 * 1000)
    assert reopened(path) == records[-10:]


# -- the option -------------------------------------------------------------------------------


def test_history_file_needs_history() -> None:
    line = usage_error(run_cli("--host", HOST, "--port", "0", "--history-file", "h.log"),
                       "--history-file")
    assert line.endswith("--history-file needs --history (see --help)"), line


def test_history_file_does_not_go_with_redis() -> None:
    line = usage_error(run_cli("--host", HOST, "--port", "0", "--history", "5",
                               "--history-file", "h.log", "--redis", "redis://127.0.0.1:1"),
                       "--history-file")
    assert "--redis" in line and "streams keep the history" in line, line


def test_history_file_of_no_name_is_refused() -> None:
    usage_error(run_cli("--host", HOST, "--port", "0", "--history", "5", "--history-file", ""),
                "--history-file")


def test_history_file_from_the_command_line_or_a_config_file(tmp_path: Path) -> None:
    assert build({"history": 5, "history_file": "h.log"}).history_file == "h.log"
    assert build({}).history_file is None
    config = tmp_path / "fsmchat.toml"
    config.write_text('history = 5\nhistory-file = "kept.log"\n')
    assert build(read_config(str(config))).history_file == "kept.log"
    config.write_text('history-file = "kept.log"\n')
    with pytest.raises(UsageError, match="--history-file needs --history"):
        build(read_config(str(config)))
