"""What TLS costs fsmchat per delivered message, against plain TCP: one server build, one load.

    python bench/tls.py [--quick] [--json PATH] [--repeats 3] [--clients 50] [--rates 10,20]
                        [--fsmchat DIR] [--out DIR]

A throwaway CA and server certificate (trustme, for ``localhost`` and 127.0.0.1) go into a
temporary directory. Every run starts a fresh server with the same command line,

    python -m fsmchat --host 127.0.0.1 --port 0 --tls-port 0 --tls-cert C --tls-key K
                      --log-level info --drain-timeout 2

and its clients connect either all to ``port`` (``plain``) or all to ``tls_port`` (``TLS``):
the relay, its options and the load are the same, only the transport differs. Runs alternate
plain, TLS, plain, TLS, ... (``--repeats`` of each); each run measures, one after the other:

1. ``64B@R`` for each R of ``--rates`` (10 and 20): ``--clients`` clients (50) x R msg/s each,
   64-byte messages, paced (evenly spread: one message every 2 ms, or every 1 ms as in run.py's
   CPU figure); per-sender order checked. At 10/s every delivery is one send (one segment, one
   TLS record) to one client; at 20/s the relay starts to put two messages in one send now and
   then, and more often with TLS (``TCP segments per delivery``).
2. ``4096B@R``: 4,096-byte messages (``--large-size``) at the first rate.
3. ``burst``: ``--burst-clients`` clients (20) keep their sockets full of 64-byte frames for a
   few seconds; the relay batches as much as it can, and the generator is the limit.

The method, the clients (``harness.counting``: plain sockets that count bytes, TLS sockets
that have done their handshake), the figures and the checks are ``harness.alternating``'s; here
are only the certificates and the two ports.

Prints a table (min / median / max of the runs per configuration, and TLS over plain),
progress on stderr; the result (every step) goes to ``results/tls-<date>.json``. Steps where
other processes used 0.15 of a core or more are flagged. Every process it starts is stopped at
the end, also on errors, SIGINT, SIGTERM and SIGHUP. ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import ssl
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness.alternating import Run, alternate, one_run, parse, report
from harness.counting import SERVER_NAME, Generator
from harness.server import HOST, Server, fsmchat
from harness.suite import Session, sigint_ignored

CONFIGS = ("plain", "tls")
LABEL = {"plain": "plain", "tls": "TLS"}


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA and a server certificate for ``localhost`` and 127.0.0.1: (CA, cert, key)."""
    import trustme  # noqa: PLC0415 - a test dependency, needed here only

    ca = trustme.CA()
    leaf = ca.issue_cert(SERVER_NAME, HOST)
    ca_pem, cert, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return ca_pem, cert, key


def server_argv(cert: Path, key: Path) -> list[str]:
    return fsmchat("--port", "0", "--tls-port", "0", "--tls-cert", str(cert), "--tls-key",
                   str(key), "--log-level", "info", "--drain-timeout", "2")


def port_of(config: str) -> Callable[[Server], int]:
    return lambda srv: int(srv.started.get("tls_port") or 0) if config == "tls" else srv.port


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(
        args_list, description="fsmchat: server CPU per delivered message over TLS against "
        "plain TCP")
    session = Session("tls", args, args_list, logdir=args.logdir)

    def body() -> int:
        with tempfile.TemporaryDirectory(prefix="fsmchat-tls-certs-") as certdir:
            ca, cert, key = make_certs(Path(certdir))
            argv = server_argv(cert, key)
            with sigint_ignored():  # forked before any thread
                gens = {"plain": Generator(None, args.procs), "tls": Generator(str(ca), args.procs)}
            try:
                def one(config: str, repeat: int) -> Run:
                    return one_run(gens[config], config, repeat, argv=argv, workloads=workloads,
                                   prof=prof, session=session, labels=LABEL,
                                   port=port_of(config))

                runs = alternate(CONFIGS, prof, one)
            finally:
                for gen in gens.values():
                    gen.close()
        return report(session, runs, workloads, CONFIGS, labels=LABEL, prof=prof,
                      openssl=ssl.OPENSSL_VERSION,
                      server_command=" ".join(argv[1:]).replace(certdir, "$CERTS"))

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
