"""What the default ``--log-level debug`` stream costs fsmchat per delivered message, against info.

    python bench/logs.py [--quick] [--json PATH] [--repeats 3] [--clients 50]

Every run starts a fresh server with the same command line but for the level,

    python -m fsmchat --host 127.0.0.1 --port 0 --drain-timeout 2 --log-level L

``info`` (a few lines per connection) and ``debug`` (the default: one ``data.received`` per read
and one ``data.sent`` per write, besides). Runs alternate info, debug, info, ... (``--repeats``
of each). The steps, the clients, the checks and the figures are ``bench/tls.py``'s (imported
from it): paced 64-byte messages at 10 and 20 msg/s from 50 clients, 4,096-byte ones at 10
msg/s, and 20 clients bursting; the server's ``utime + stime`` over the deliveries, and so on.

The bench reads the server's stdout as fast as it comes, as ``jq`` or a log shipper would, and
parses every line but the debug ones (it needs ``server.started``, the problems and
``server.stopped``). A debug run whose events the server had to drop (``log.dropped``: the
bench fell behind) would measure less logging than asked for: it is an error of that run.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from loadgen import raise_nofile
from run import HOST, PY, Spec, say, stop_all
from tls import (
    Generator,
    Run,
    TlsServer,
    begin,
    finish_run,
    one_run,
    parse,
    report,
)

CONFIGS = ("info", "debug")
LABELS = {"info": "--log-level info", "debug": "--log-level debug"}


class LogServer(TlsServer):
    """``tls.py``'s server reader, which skips the debug lines and counts dropped events."""

    log_stdout = False

    def __init__(self, spec: Spec, logdir: Path) -> None:
        super().__init__(spec, logdir)
        self.dropped = 0  # events the server reported as dropped (log.dropped)

    def _scan(self, lines: bytes) -> None:
        super()._scan(b"\n".join(line for line in lines.splitlines()
                                 if b'"level":"debug"' not in line[:64]))

    def _event(self, event: dict[str, Any], raw: bytes) -> None:
        if event.get("event") == "log.dropped":
            self.dropped += int(event.get("count", 0))
        super()._event(event, raw)


def server_argv(level: str) -> list[str]:
    return [PY, "-m", "fsmchat", "--host", HOST, "--port", "0", "--drain-timeout", "2",
            "--log-level", level,
            "--max-clients-per-addr", "0"]  # every client comes from one address


def finish_logs(run: Run, srv: TlsServer) -> None:
    """``tls.finish_run``, and no event dropped: what was measured is the whole stream."""
    finish_run(run, srv)
    dropped = srv.dropped if isinstance(srv, LogServer) else 0
    if dropped:
        run.errors.append(f"the server dropped {dropped} events: the bench read stdout too "
                          "slowly, and the run measured less logging than asked for")
    run.problems.pop("log.dropped", None)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(
        args_list, description="fsmchat: server CPU per delivered message at --log-level "
        "debug (the default) against info")
    argvs = {level: server_argv(level) for level in CONFIGS}
    env, logdir = begin("logs", args, prof, args_list, workloads,
                        server_commands={c: " ".join(a[1:]) for c, a in argvs.items()})
    started = time.monotonic()
    runs: list[Run] = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # forked before any thread
    try:
        gen = Generator(None, args.procs, name="logs-bench")
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for repeat in range(1, prof.repeats + 1):
            for config in CONFIGS:
                runs.append(one_run(gen, config, repeat, argv=argvs[config],
                                    workloads=workloads, prof=prof, logdir=logdir,
                                    labels=LABELS, server_class=LogServer,
                                    finish=finish_logs))
    except KeyboardInterrupt as exc:
        say(f"interrupted ({str(exc) or 'SIGINT'}); every process this bench started was "
            "stopped")
        return 130
    finally:
        gen.close()
        stop_all()
    return report(runs, workloads, CONFIGS, labels=LABELS, env=env, started=started,
                  logdir=logdir, json_path=args.json)


if __name__ == "__main__":
    raise_nofile()
    sys.exit(main())
