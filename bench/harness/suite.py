"""What every suite does first and last: common options, signals, the checkout, the results.

Every suite takes ``--fsmchat DIR`` (measure the fsmchat package of another checkout:
``harness.checkout``) and ``--out DIR`` (where its dated JSON result goes, ``bench/results`` by
default). ``Session`` is one run of a suite: it raises the descriptor limit, makes SIGINT,
SIGTERM and SIGHUP raise KeyboardInterrupt (so every process the suite started is stopped on
the way out: a shell starts a background job with SIGINT ignored, and Python leaves it so),
and at the end prints the tables and writes the result. A user's error is one line and exit
status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from harness import checkout
from harness.report import RESULTS, Table, now, say, write
from harness.server import raise_nofile, stop_all


def add_options(parser: argparse.ArgumentParser, *, out: bool = True) -> None:
    parser.add_argument("--fsmchat", type=Path, metavar="DIR",
                        help="measure the fsmchat package of the checkout in DIR (a worktree "
                             "of another commit) instead of this one")
    if out:
        parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                            help="where the dated JSON result goes (default: bench/results)")


def usage_error(suite: str, message: str) -> NoReturn:
    print(f"{suite}.py: {message}", file=sys.stderr)
    sys.exit(2)


def interrupt_on_signals() -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """While forking load generators: they ignore Ctrl-C (sent to the whole foreground
    group), and the suite stops them."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Session:
    """One run of a suite."""

    def __init__(self, suite: str, args: argparse.Namespace, argv: list[str], *,
                 logdir: Path | None = None) -> None:
        self.suite = suite
        self.argv = argv
        self.out: Path = getattr(args, "out", RESULTS)
        self.json_copy: Path | None = getattr(args, "json", None)  # a suite's --json PATH
        if args.fsmchat is not None:
            try:
                checkout.use(args.fsmchat)
            except checkout.CheckoutError as exc:
                usage_error(suite, str(exc))
            say(f"measuring the fsmchat of {checkout.current().root}")
        self.checkout = checkout.current()
        self.sources = self.checkout.digest()
        self.nofile = raise_nofile()
        self.started = now()
        self.t0 = time.monotonic()
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix=f"fsmchat-{suite}-"))
        self.logdir.mkdir(parents=True, exist_ok=True)
        interrupt_on_signals()

    def run(self, body: Callable[[], int]) -> int:
        """``body``, with every server stopped on the way out; 130 when interrupted."""
        try:
            return body()
        except KeyboardInterrupt as exc:
            say(f"interrupted ({str(exc) or 'SIGINT'}); every process this bench started was "
                "stopped")
            return 130
        finally:
            stop_all()

    def same_build(self) -> bool:
        """Whether the sources measured are still those of the start: one build throughout."""
        return self.checkout.digest() == self.sources

    def finish(self, tables: list[Table], notes: list[str], figures: dict[str, Any]) -> Path:
        """Print the tables and notes, write the result; its path."""
        print("\n\n".join(t.text() for t in tables))
        if notes:
            print()
            print("\n".join(notes))
        figures = {"logdir": str(self.logdir), "nofile": self.nofile, **figures}
        path = write(self.suite, self.out, argv=self.argv, tables=tables, notes=notes,
                     figures=figures, started=self.started,
                     seconds=time.monotonic() - self.t0)
        if self.json_copy is not None:
            self.json_copy.write_text(path.read_text())
        print(f"\n{self.suite}: {(time.monotonic() - self.t0) / 60:.1f} min; result: {path}"
              + (f" (and {self.json_copy})" if self.json_copy else "") + f"; logs: {self.logdir}")
        return path
