"""The history a standalone server keeps across restarts: its memory mirrored in a file.

With ``--history-file`` the history in memory (chat mode's rooms, raw mode's one) is still what
newcomers are given; the keeper (an extension of the hub) loads it from the file at the start,
appends each message it keeps (``kept``: told by the history as it takes a message), writes what
was appended once per loop turn (``end_of_turn``), rewrites the file with only what the history
still holds when the file grew past twice that, and syncs it to disk at the stop. The file's
format and its rules (torn records, atomic rewrites, one server per file) are
``history_file.py``'s.

Rules it keeps:
- A message reaches the file in the loop turn it was said, with one ``write`` for all of that
  turn's: nothing waits on the disk per message, and no fsync but at the stop and in a rewrite.
- A write that fails (disk full) is one warning (``history.unwritten``); the chat goes on, and
  the next rewrite puts back what the history still holds.
- No message content goes into the event log: events say how many bytes and records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from structlog.typing import FilteringBoundLogger

from fsmchat.history_file import HistoryFile, HistoryFileError, Record
from fsmchat.hub import Extension

Live = Callable[[], Iterator[Record]]
"""What the history holds now, as records, oldest first."""


class HistoryKeeper(Extension):
    __slots__ = ("file", "live", "live_bytes", "log", "failing")

    def __init__(self, file: HistoryFile, log: FilteringBoundLogger, *, live: Live,
                 live_bytes: Callable[[], int]) -> None:
        self.file = file
        self.log = log
        self.live = live
        self.live_bytes = live_bytes  # bytes the history holds now
        self.failing = False  # the last write failed (warned once until one succeeds)

    def kept(self, stream: bytes, msg_id: bytes, data: bytes) -> None:
        """The history took ``data`` (of room ``stream``, b"" raw): for the file too."""
        self.file.append(Record(stream, msg_id, int(time.time() * 1000), data))

    def end_of_turn(self) -> None:
        file = self.file
        if not file.pending:
            return
        try:
            if file.needs_compaction(self.live_bytes()):
                self._rewrite()
            else:
                file.flush()
        except HistoryFileError as exc:
            self._failed(exc)
            return
        self.failing = False

    def _rewrite(self) -> None:
        before = self.file.size + self.file.pending
        kept = self.file.compact(list(self.live()))
        self.log.info("history.rewritten", path=self.file.path, records=len(kept),
                      bytes=self.file.size, before=before)

    def _failed(self, exc: HistoryFileError) -> None:
        if not self.failing:
            self.failing = True
            self.log.warning("history.unwritten", path=self.file.path, error=str(exc))

    def drain(self) -> None:
        """The stop: what waits is written, and the file synced to disk."""
        try:
            self.file.sync()
        except (HistoryFileError, OSError) as exc:
            self._failed(HistoryFileError(str(exc)))

    def forced(self, reason: str) -> None:
        self.drain()
