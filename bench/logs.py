"""What the default ``--log-level debug`` stream costs fsmchat per delivered message, against info.

    python bench/logs.py [--quick] [--json PATH] [--repeats 3] [--clients 50] [--fsmchat DIR]

Every run starts a fresh server with the same command line but for the level,

    python -m fsmchat --host 127.0.0.1 --port 0 --drain-timeout 2 --log-level L

``info`` (a few lines per connection) and ``debug`` (the default: one ``data.received`` per read
and one ``data.sent`` per write, besides). Runs alternate info, debug, info, ... (``--repeats``
of each). The steps, the clients, the checks and the figures are ``bench/tls.py``'s
(``harness.alternating``): paced 64-byte messages at 10 and 20 msg/s from 50 clients,
4,096-byte ones at 10 msg/s, and 20 clients bursting; the server's ``utime + stime`` over the
deliveries, and so on.

The bench reads the server's stdout as fast as it comes, as ``jq`` or a log shipper would, and
parses every line but the debug ones (it needs ``server.started``, the problems and
``server.stopped``). A debug run whose events the server had to drop (``log.dropped``: the
bench fell behind) would measure less logging than asked for: it is an error of that run.
"""

from __future__ import annotations

import sys

from harness.alternating import Run, alternate, finish_run, one_run, parse, report
from harness.counting import Generator
from harness.server import Server, fsmchat
from harness.suite import Session, sigint_ignored

CONFIGS = ("info", "debug")
LABELS = {"info": "--log-level info", "debug": "--log-level debug"}


def server_argv(level: str) -> list[str]:
    return fsmchat("--port", "0", "--drain-timeout", "2", "--log-level", level)


def finish_logs(run: Run, srv: Server) -> None:
    """``finish_run``, and no event dropped: what was measured is the whole stream."""
    finish_run(run, srv)
    if srv.dropped:
        run.errors.append(f"the server dropped {srv.dropped} events: the bench read stdout too "
                          "slowly, and the run measured less logging than asked for")
    run.problems.pop("log.dropped", None)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(
        args_list, description="fsmchat: server CPU per delivered message at --log-level "
        "debug (the default) against info")
    session = Session("logs", args, args_list, logdir=args.logdir)
    argvs = {level: server_argv(level) for level in CONFIGS}

    def body() -> int:
        with sigint_ignored():  # forked before any thread
            gen = Generator(None, args.procs, name="logs-bench")
        try:
            def one(config: str, repeat: int) -> Run:
                return one_run(gen, config, repeat, argv=argvs[config], workloads=workloads,
                               prof=prof, session=session, labels=LABELS, read="no-debug",
                               keep_stdout=False, finish=finish_logs)

            runs = alternate(CONFIGS, prof, one)
        finally:
            gen.close()
        return report(session, runs, workloads, CONFIGS, labels=LABELS, prof=prof,
                      server_commands={c: " ".join(a[1:]) for c, a in argvs.items()})

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
