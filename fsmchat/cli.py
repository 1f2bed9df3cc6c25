"""Command line: ``fsmchat [options]`` serves; ``fsmchat connect HOST PORT`` is a terminal client;
``fsmchat diagrams [options]`` draws the lifecycles; ``fsmchat docs [--check]`` rewrites the
generated tables of the documentation; ``fsmchat passwd NAME`` adds or changes an account.

The options themselves (flags, parsers, defaults, help) are ``options.OPTIONS``; this module
builds argparse from them, reads ``--config FILE`` when given (the command line wins over the
file) and runs the server with the ``Options`` that result. Every mistake in the arguments or
the file ends with status 2 and one line on stderr that names the option, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from fsmchat import __version__
from fsmchat.lifecycle import LIFECYCLES
from fsmchat.options import (
    ConfigError,
    UsageError,
    add_arguments,
    build,
    from_command_line,
    read_config,
)
from fsmchat.server import run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsmchat",
        description="An event-driven chat relay: every byte a client sends is forwarded to every "
                    "other connected client. One select() loop, a state machine per connection, "
                    "one JSON status event per line on stdout.",
        epilog="Other commands: fsmchat connect HOST PORT, a terminal client for chatting "
               "(fsmchat connect --help); fsmchat diagrams, which draws the connection "
               "lifecycle (fsmchat diagrams --help); fsmchat docs (fsmchat docs --help); "
               "fsmchat passwd NAME, which adds or changes an account for --accounts "
               "(fsmchat passwd --help).",
    )
    add_arguments(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["connect"]:
        return connect_main(args[1:])
    if args[:1] == ["diagrams"]:
        return diagrams_main(args[1:])
    if args[:1] == ["docs"]:
        return docs_main(args[1:])
    if args[:1] == ["passwd"]:
        return passwd_main(args[1:])
    parser = build_parser()
    given = from_command_line(parser.parse_args(args))
    config = given.pop("config", None)
    try:
        options = build({**read_config(config), **given} if config is not None else given)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    except UsageError as exc:
        parser.error(str(exc))
    return run(options)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1 to 65535")
    return port


def build_connect_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsmchat connect",
        description="Chat on an fsmchat server (chat or raw mode, plain TCP or TLS) from a "
                    "terminal: lines that arrive are printed above the line you are typing, "
                    "which stays intact. Enter sends the line (with \\n); Up and Down recall the "
                    "lines you typed; Ctrl-D (on an empty line) or Ctrl-C leaves. What the "
                    "server sends is shown as chat mode cleans text: control characters in "
                    "caret notation (ESC as ^[), invalid UTF-8 as U+FFFD. When standard input "
                    "or output is not a terminal, it sends the lines it reads and prints the "
                    "lines that arrive, until the server closes the connection.",
        epilog="Exit status: 0 once connected (the server closed, or you left with Ctrl-D), "
               "1 if it could not connect, 2 for bad arguments, 130 for Ctrl-C.",
    )
    parser.add_argument("host", metavar="HOST", help="the server's name or address")
    parser.add_argument("port", metavar="PORT", type=_port,
                        help="its port: the plain one, or the TLS one with --tls")
    parser.add_argument("--tls", action="store_true",
                        help="connect over TLS and verify the server's certificate and name "
                             "(against the system's CAs, or --ca FILE's)")
    parser.add_argument("--ca", type=Path, metavar="FILE",
                        help="trust the CA certificates (PEM) in FILE instead of the "
                             "system's, as for a self-signed server; implies --tls")
    return parser


def connect_main(argv: list[str]) -> int:
    parser = build_connect_parser()
    args = parser.parse_args(argv)
    from fsmchat import connect  # noqa: PLC0415 - here only: the server never loads the client

    context = None
    if args.tls or args.ca is not None:
        try:
            context = connect.tls_context(args.ca)
        except connect.CaError as exc:
            parser.error(f"--ca {args.ca}: {exc}")
    return connect.run(connect.Target(args.host, args.port, context))


def build_diagrams_parser() -> argparse.ArgumentParser:
    from fsmchat import diagrams  # noqa: PLC0415 - drawing (graphviz) is not loaded to serve
    parser = _Parser(
        prog="fsmchat diagrams",
        description="Draw every lifecycle the server runs, from the same tables it runs: "
                    "Mermaid (.mmd), Graphviz source (.dot) and, when Graphviz's dot is "
                    "installed, SVG (.svg).",
    )
    parser.add_argument("--out", type=Path, default=Path("diagrams"), metavar="DIR",
                        help="folder to write into, created if missing (default: %(default)s)")
    parser.add_argument("--format", choices=diagrams.FORMATS, action="append", dest="formats",
                        help="write only this format; repeat for several (default: all; svg is "
                             "skipped with a note when dot is not installed)")
    return parser


def diagrams_main(argv: list[str]) -> int:
    from fsmchat import diagrams  # noqa: PLC0415 - as above
    args = build_diagrams_parser().parse_args(argv)
    formats: list[str] = args.formats or list(diagrams.FORMATS)
    have_dot = shutil.which("dot") is not None
    if "svg" in formats and not have_dot:
        if args.formats:
            print("fsmchat diagrams: --format svg needs Graphviz's dot, which is not installed "
                  "(Debian: apt-get install graphviz)", file=sys.stderr)
            return 1
        print("fsmchat diagrams: dot not found, SVG skipped (install Graphviz for it); "
              "Mermaid and DOT sources written", file=sys.stderr)
        formats.remove("svg")
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for lifecycle in LIFECYCLES:
            written = diagrams.write(lifecycle, out, formats)
            for path in written:
                print(path)
    except OSError as exc:
        print(f"fsmchat diagrams: cannot write to {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def build_docs_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsmchat docs",
        description="Rewrite the generated regions of the Markdown files in a folder (tables of "
                    "options, events, metrics, states and triggers, and the diagrams) from the "
                    "code's own catalogues.",
    )
    parser.add_argument("--dir", type=Path, default=Path("docs"), metavar="DIR",
                        help="folder of Markdown files (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 naming each file that is stale")
    return parser


def docs_main(argv: list[str]) -> int:
    from fsmchat import docs  # noqa: PLC0415 - it draws diagrams, not loaded to serve
    args = build_docs_parser().parse_args(argv)
    folder: Path = args.dir
    paths = sorted(folder.glob("*.md"))
    if not paths:
        print(f"fsmchat docs: no Markdown files in {folder}", file=sys.stderr)
        return 1
    try:
        stale = docs.update(paths, docs.regions(build_parser()), check=args.check)
    except docs.DocsError as exc:
        print(f"fsmchat docs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fsmchat docs: cannot rewrite {exc.filename}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    for path in stale:
        if args.check:
            print(f"fsmchat docs: {path} is stale: run `{docs.COMMAND}` and commit the result",
                  file=sys.stderr)
        else:
            print(path)
    return 1 if args.check and stale else 0


def build_passwd_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsmchat passwd",
        description="Add an account to the accounts file (for --accounts) or change its "
                    "password. On a terminal it asks for the password twice, without showing "
                    "it; otherwise it reads one line from standard input. The file is "
                    "rewritten at once (a temporary file, then a rename); a new one is made "
                    "readable by you alone (mode 0600). The server reads the file when it "
                    "starts: restart it to use the change.",
        epilog="Exit status: 0 when the account was written, 1 if it could not be, 2 for bad "
               "arguments.",
    )
    parser.add_argument("name", metavar="NAME",
                        help="the account's name: 1 to 16 letters, digits, - or _")
    parser.add_argument("--accounts", default=DEFAULT_ACCOUNTS, metavar="FILE",
                        help="the accounts file, created if missing (default: %(default)s)")
    op = parser.add_mutually_exclusive_group()
    op.add_argument("--op", action="store_const", const=True, dest="op",
                    help="make it an operator (/kick, /mute, /topic)")
    op.add_argument("--no-op", action="store_const", const=False, dest="op",
                    help="make it an operator no more (default: an account keeps what it was; "
                         "a new one is no operator)")
    return parser


DEFAULT_ACCOUNTS = "fsmchat.accounts"


def passwd_main(argv: list[str]) -> int:
    args = build_passwd_parser().parse_args(argv)
    from fsmchat.chat import accounts  # noqa: PLC0415 - argon2 only where accounts are used

    try:
        password = _read_password(args.name)
        new = accounts.set_account(args.accounts, args.name, password, args.op)
    except accounts.AccountsError as exc:
        print(f"fsmchat passwd: {exc}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("fsmchat passwd: no password given; nothing changed", file=sys.stderr)
        return 1
    print(f"fsmchat passwd: {'added' if new else 'changed'} {args.name} in {args.accounts}",
          file=sys.stderr)
    return 0


def _read_password(name: str) -> str:
    """Twice without echo on a terminal (they must match); else one line of standard input."""
    from fsmchat.chat.accounts import AccountsError  # noqa: PLC0415

    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != first:
            raise AccountsError("the two passwords differ; nothing changed")
        return first
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")
