"""What rooms cost chat mode's common case, everyone in one room: this build against the one before.

    python bench/rooms.py --before DIR [--quick] [--json PATH] [--repeats 3] [--history 100]
                          [--fsmchat DIR] [--out DIR]

``--before DIR`` is a checkout of the commit before rooms (``git worktree add DIR COMMIT``, or
``git archive COMMIT fsmchat | tar -x -C DIR``); its fsmchat package is run as ``--fsmchat``
runs one (``harness.checkout``), while this checkout's (or ``--fsmchat``'s) is the other. Every
run is a fresh server with the same command line,

    python -m fsmchat --host 127.0.0.1 --port 0 --log-level info --drain-timeout 2 --mode chat
        --max-clients-per-addr 0 [--history N]

``before`` and ``rooms`` without history, ``before+hN`` and ``rooms+hN`` with ``--history N``
(100 by default; ``--history 0``: those two are left out), alternating before, rooms, ... The
load, the clients and the checks are ``bench/chat.py``'s (``ChatWorker``, ``check_lines``): 64-byte
lines at 10 and 20 msg/s from 50 clients, 4,096-byte ones at 10 msg/s, 20 clients bursting; no
client types a command, so everyone stays in the lobby, and every line reaches every other
client. The figure is the server's CPU per delivery (one line to one other client), rooms over
before: the goal is at most 1.05x. The tables compare rooms with before, and rooms+hN with
before+hN; the result goes to ``results/rooms-<date>.json``. Exit status 1 on an error in any
run, or when either build's sources changed during the bench.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from chat import (
    DRAIN_TIMEOUT,
    MIN_LINE,
    chat_worker_main,
    check_lines,
    finish_chat,
    server_argv,
)
from harness import checkout
from harness.alternating import Run, alternate, notes, one_run, parse, report, tables
from harness.counting import Generator
from harness.suite import Session, sigint_ignored, usage_error


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--before", type=Path, metavar="DIR", required=True,
                        help="a checkout of the commit before rooms, measured against this one")
    parser.add_argument("--history", type=int, default=100, metavar="N",
                        help="also runs both with --history N; 0: none (default: 100)")
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT, metavar="S",
                        help="seconds a step may take to deliver what was sent (default: "
                             "%(default)g)")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(
        args_list, description="fsmchat: server CPU per delivered line in chat mode, everyone "
        "in one room, against the build before rooms", min_size=MIN_LINE, extend=add_options)
    if args.history < 0:
        usage_error("rooms", "--history must be 0 or more")
    prof = replace(prof, drain_timeout=args.drain_timeout)
    session = Session("rooms", args, args_list, logdir=args.logdir)
    after = checkout.current()
    try:
        before = checkout.use(args.before)
    except checkout.CheckoutError as exc:
        usage_error("rooms", str(exc).replace("--fsmchat", "--before"))
    checkout.CHECKOUT = after
    before_sources = before.digest()
    h = f"+h{args.history}"
    plain = ("before", "rooms")
    with_history = (f"before{h}", f"rooms{h}") if args.history else ()
    configs = plain + with_history
    labels = {c: c for c in configs}
    max_line = max(w.size for w in workloads) - 1
    argvs = {c: server_argv("history" if c.endswith(h) and args.history else "chat",
                            args.history, max_line) for c in configs}

    def body() -> int:
        with sigint_ignored():
            gen = Generator(None, args.procs, target=chat_worker_main, name="rooms-bench")
        try:
            def one(config: str, repeat: int) -> Run:
                checkout.CHECKOUT = before if config.startswith("before") else after
                try:
                    return one_run(gen, config, repeat, argv=argvs[config],
                                   workloads=workloads, prof=prof, session=session,
                                   labels=labels, check=check_lines, finish=finish_chat)
                finally:
                    checkout.CHECKOUT = after

            runs = alternate(configs, prof, one)
        finally:
            gen.close()
        received = {c: "every line every other client sent, after its sender's name"
                    for c in configs}
        extra_tables, extra_summary = (tables(runs, workloads, with_history, labels)
                                       if with_history else ([], {}))
        extra_notes = notes(runs, workloads, with_history, labels, received)
        if before.digest() != before_sources:
            extra_notes.append("error: the --before sources changed during the run")
            runs[0].errors.append("the --before sources changed during the run")
        return report(session, runs, workloads, plain, labels=labels, prof=prof,
                      received=received, tables_after=extra_tables, notes_after=extra_notes,
                      before=before.facts(), summary_history=extra_summary,
                      server_commands={c: " ".join(a[1:]) for c, a in argvs.items()})

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
