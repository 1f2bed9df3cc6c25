"""Command line: ``fsmchat [options]`` serves; ``fsmchat diagrams [options]`` draws the lifecycles;
``fsmchat docs [--check]`` rewrites the generated tables of the documentation.

Every mistake in the arguments ends with status 2 and one line on stderr that names the option,
never a traceback.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from fsmchat import __version__, diagrams, docs
from fsmchat.access import Network, parse_network
from fsmchat.chat import DEFAULT_MAX_LINE, MAX_LINE_RANGE
from fsmchat.connection import RECV_SIZE
from fsmchat.events import FORMATS, LEVELS
from fsmchat.lifecycle import LIFECYCLES
from fsmchat.logstream import DEFAULT_LOG_BUFFER
from fsmchat.loop import FD_SETSIZE
from fsmchat.redis_link import RedisAddress
from fsmchat.server import (
    DEFAULT_CHANNEL,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HISTORY_BYTES,
    DEFAULT_MAX_CLIENTS_PER_ADDR,
    DEFAULT_MAX_QUEUE_BYTES,
    DEFAULT_REDIS_OUTBOX,
    DEFAULT_STATS_INTERVAL,
    MAX_CLIENTS_CEILING,
    MODES,
    RESERVED_FDS,
    Options,
    run,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: expected a whole number from 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be from 0 to 65535")
    return port


MAX_SECONDS = 365 * 24 * 3600
"""The longest duration an option takes: a year. Longer is no timeout anyone means (0 says
"never" where that makes sense), and far timers must stay well inside what select can wait."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}: expected a number from 0 to {MAX_SECONDS} "
            "(a year)")
    return value


def _host(text: str) -> str:
    """An address, or a name the resolver can take: dot-separated labels of 1 to 63 characters."""
    try:
        text.encode("idna")
    except UnicodeError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid address or host name {text!r}: {exc.__cause__ or exc} (a name is labels "
            "of 1 to 63 characters between dots)") from None
    return text


_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _with_unit(text: str) -> int | None:
    """``512``, ``64K``, ``4M``, ``1G`` (binary units) as a number; None when it is not one."""
    number, unit = text.strip(), ""
    if number[-1:].lower() in _UNITS:
        number, unit = number[:-1], number[-1].lower()
    try:
        return int(number, 10) * _UNITS[unit]
    except ValueError:
        return None


def _bytes(text: str) -> int:
    value = _with_unit(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected bytes as a whole number, or with K, M or G")
    if value < RECV_SIZE:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: must be at least {RECV_SIZE} (64K), the largest message")
    return value


LOG_BUFFER_MIN = 64 * 1024


def _log_buffer(text: str) -> int:
    value = _with_unit(text)
    if value is None or value < LOG_BUFFER_MIN:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected bytes, at least 64K, with K, M or G if you like")
    return value


def _line_size(text: str) -> int:
    value = _with_unit(text)
    low, high = MAX_LINE_RANGE
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"invalid line size {text!r}: expected bytes from {low} to {high} (64K), "
            "with K if you like")
    return value


HISTORY_MAX = 1_000_000


def _whole(text: str) -> int | None:
    try:
        return int(text, 10)
    except ValueError:
        return None


def _whole_in(text: str, low: int, high: int, message: str) -> int:
    value = _whole(text)
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(message)
    return value


def _history(text: str) -> int:
    return _whole_in(text, 0, HISTORY_MAX, f"invalid number of messages {text!r}: expected a "
                                           f"whole number from 0 to {HISTORY_MAX:,}")


def _some_bytes(text: str) -> int:
    return _at_least_one(text, "size", "bytes")


def _clients(text: str) -> int:
    return _whole_in(text, 1, MAX_CLIENTS_CEILING,
                     f"invalid number {text!r}: must be from 1 to {MAX_CLIENTS_CEILING}, the "
                     f"most select() can watch with {RESERVED_FDS} descriptors kept in reserve")


def _per_addr(text: str) -> int:
    return _whole_in(text, 0, MAX_CLIENTS_CEILING,
                     f"invalid number {text!r}: must be from 0 (no limit) to "
                     f"{MAX_CLIENTS_CEILING}")


def _network(text: str) -> Network:
    try:
        return parse_network(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid network {text!r}: expected an address or CIDR such as 10.0.0.0/8, "
            "192.0.2.7 or 2001:db8::/32") from None


def _rate(text: str) -> int:
    return _at_least_one(text, "rate", "bytes per second")


def _at_least_one(text: str, what: str, unit: str) -> int:
    value = _with_unit(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid {what} {text!r}: expected {unit}, a whole number of 1 or more, with K, M "
            "or G if you like")
    return value


def _redis_url(text: str) -> RedisAddress:
    try:
        return RedisAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid Redis URL {text!r}: {exc}") from None


def _channel(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("invalid channel '': a channel needs a name")
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8
        raise argparse.ArgumentTypeError(
            f"invalid channel {text!r}: a channel name must be UTF-8") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fsmchat",
        description="An event-driven chat relay: every byte a client sends is forwarded to every "
                    "other connected client. One select() loop, a state machine per connection, "
                    "one JSON status event per line on stdout.",
        epilog="Draw the connection lifecycle with: fsmchat diagrams --help",
    )
    parser.add_argument("--port", type=_port, default=8080,
                        help="TCP port to listen on; 0 picks a free one, reported in the "
                             "server.started event (default: %(default)s)")
    parser.add_argument("--host", type=_host, default=None, metavar="ADDR",
                        help="address or host name to listen on (default: every interface, "
                             "IPv6 and IPv4)")
    parser.add_argument("--log-level", choices=LEVELS, default="debug",
                        help="least important events shown: debug shows every read and write, "
                             "info only the lifecycle (accepts, closes, start, stop), warning only "
                             "problems (default: %(default)s)")
    parser.add_argument("--log-format", choices=FORMATS, default="json",
                        help="json: one JSON object per line, for jq and log aggregators; "
                             "console: the same events for people (default: %(default)s)")
    parser.add_argument("--log-buffer", type=_log_buffer, default=DEFAULT_LOG_BUFFER,
                        metavar="BYTES",
                        help="most bytes of events waiting for a slow log reader; past half of "
                             "it debug events are dropped, past three quarters info too, then "
                             "everything, each counted and reported in a log.dropped event "
                             "once the reader catches up. Takes K, M, G (default: 4M)")
    parser.add_argument("--drain-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                        help="on SIGINT/SIGTERM/SIGHUP, how long the stop may take: clients are "
                             "read until they have nothing more (for at most half of it), then "
                             "receive what is queued for them, then are closed anyway; a second "
                             "signal closes them at once (default: %(default)s)")
    parser.add_argument("--max-clients", type=_clients, default=None, metavar="N",
                        help="most clients connected at once; more are accepted and closed at "
                             f"once (default: the smaller of {FD_SETSIZE} and the descriptor "
                             f"limit, less {RESERVED_FDS}; at most {MAX_CLIENTS_CEILING})")
    parser.add_argument("--max-clients-per-addr", type=_per_addr,
                        default=DEFAULT_MAX_CLIENTS_PER_ADDR, metavar="N",
                        help="most clients one address (an IPv4 address, an IPv6 /64) may have "
                             "connected at once; more are accepted and closed at once (reason "
                             "per_addr_limit); 0: no limit, as behind a proxy on this machine "
                             "(default: %(default)s)")
    parser.add_argument("--max-queue-bytes", type=_bytes, default=DEFAULT_MAX_QUEUE_BYTES,
                        metavar="BYTES",
                        help="output limit per client: one whose queue would pass it is closed "
                             "(reason queue_limit); over half of it, senders are paused until "
                             "it catches up. Takes K, M, G (default: 4M)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="set SO_REUSEPORT on the listener, so several instances (joined "
                             "with --redis) can listen on one port; the kernel spreads new "
                             "connections over them")
    parser.add_argument("--idle-timeout", type=_seconds, default=0.0, metavar="SECONDS",
                        help="close a client that sends nothing for this long (reason "
                             "idle_timeout); 0 never does (default: 0)")
    parser.add_argument("--max-recv-rate", type=_rate, default=0, metavar="BYTES_PER_S",
                        help="most bytes per second one client may send; over it, the server "
                             "stops reading it until it has credit again, so TCP slows it "
                             "down: nothing is dropped. Takes K, M, G (default: no limit)")
    access = parser.add_argument_group(
        "access control",
        "A client that is not allowed is accepted and closed at once (connection.rejected, "
        "reason denied). Deny wins over allow.")
    access.add_argument("--allow", type=_network, action="append", default=[], metavar="CIDR",
                        help="let in only clients from these networks (repeatable; IPv4 or "
                             "IPv6; default: everyone)")
    access.add_argument("--deny", type=_network, action="append", default=[], metavar="CIDR",
                        help="keep out clients from these networks (repeatable), even when "
                             "--allow lets them in")
    secure = parser.add_argument_group(
        "TLS",
        "With --tls-cert and --tls-key, clients speak TLS: on --port, or on --tls-port beside "
        "the plain --port. One chat either way.")
    secure.add_argument("--tls-cert", default=None, metavar="FILE",
                        help="the server's certificate (PEM, with any intermediates)")
    secure.add_argument("--tls-key", default=None, metavar="FILE",
                        help="its private key (PEM)")
    secure.add_argument("--tls-port", type=_port, default=None, metavar="PORT",
                        help="serve TLS on this port, beside plain TCP on --port "
                             "(default: --port itself speaks TLS)")
    secure.add_argument("--no-plain", action="store_true",
                        help="with --tls-port: no plain TCP listener at all")
    secure.add_argument("--tls-client-ca", default=None, metavar="FILE",
                        help="require a client certificate signed by this CA (mutual TLS): "
                             "only people given one get in")
    secure.add_argument("--handshake-timeout", type=_seconds,
                        default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
                        help="close a TLS client whose handshake takes longer "
                             "(reason handshake_timeout; default: %(default)s)")
    several = parser.add_argument_group(
        "several instances, one chat",
        "Instances given the same --redis and --channel form one chat: what a client of one "
        "sends reaches the clients of all. Redis down: local chat goes on, the links retry.")
    several.add_argument("--redis", type=_redis_url, default=None, metavar="URL",
                         help="join the chat through Redis pub/sub: "
                              "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (default: standalone)")
    several.add_argument("--channel", type=_channel, default=None, metavar="NAME",
                         help=f"the pub/sub channel, the same for every instance of one chat "
                              f"(default: {DEFAULT_CHANNEL})")
    several.add_argument("--redis-outbox", type=_bytes, default=None,
                         metavar="BYTES",
                         help="most bytes of messages waiting to be published while Redis is "
                              "down or slow; past it the oldest is dropped (and counted). "
                              "Takes K, M, G (default: 8M)")
    chat = parser.add_argument_group(
        "chat mode and history",
        "raw (the default) relays bytes as they come; chat makes the relay a chat for nc and "
        "telnet users: lines, names, /nick, /who, /me, /quit, join and leave notices, and "
        "control characters made harmless.")
    chat.add_argument("--mode", choices=MODES, default="raw",
                      help="raw: every byte a client sends reaches every other client as it "
                           "is; chat: lines, each shown as '<name> text' (default: raw)")
    chat.add_argument("--max-line", type=_line_size, default=None, metavar="BYTES",
                      help="chat mode: longest line; a longer one is cut into lines of this "
                           "size, with a chat.line_cut warning. Takes K (default: 4K)")
    chat.add_argument("--history", type=_history, default=0, metavar="N",
                      help="give a newcomer the last N messages (raw: what one recv returned; "
                           "chat: lines everyone saw) before anything live; 0: none "
                           "(default: 0)")
    chat.add_argument("--history-bytes", type=_some_bytes, default=None, metavar="BYTES",
                      help="most bytes of history kept; the oldest go first. At most a quarter "
                           "of --max-queue-bytes. Takes K, M, G (default: 1M, or a quarter of "
                           "--max-queue-bytes if that is less)")
    numbers = parser.add_argument_group("numbers for operators")
    numbers.add_argument("--stats-interval", type=_seconds, default=DEFAULT_STATS_INTERVAL,
                         metavar="SECONDS",
                         help="log a server.stats event this often: connections by state, "
                              "messages and bytes, queues, closes by reason, loop figures; "
                              "0: never (default: %(default)g)")
    numbers.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                         help="serve Prometheus metrics at http://HOST:PORT/metrics, from the "
                              "same select loop (same --host; 0 picks a free port, reported "
                              "in server.started; default: off)")
    numbers.add_argument("--metrics-host", type=_host, default=None, metavar="ADDR",
                         help="address to serve metrics on, e.g. 127.0.0.1 to keep them on this "
                              "machine (default: --host)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["diagrams"]:
        return diagrams_main(args[1:])
    if args[:1] == ["docs"]:
        return docs_main(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    _check_combinations(parser, ns)
    options = Options(host=ns.host, port=ns.port, log_level=ns.log_level,
                      log_format=ns.log_format, log_buffer=ns.log_buffer,
                      drain_timeout=ns.drain_timeout,
                      max_clients=ns.max_clients, max_queue_bytes=ns.max_queue_bytes,
                      max_clients_per_addr=ns.max_clients_per_addr,
                      reuse_port=ns.reuse_port, redis=ns.redis,
                      channel=ns.channel or DEFAULT_CHANNEL,
                      redis_outbox=ns.redis_outbox or DEFAULT_REDIS_OUTBOX,
                      allow=tuple(ns.allow), deny=tuple(ns.deny),
                      idle_timeout=ns.idle_timeout, handshake_timeout=ns.handshake_timeout,
                      max_recv_rate=ns.max_recv_rate, tls_cert=ns.tls_cert,
                      tls_key=ns.tls_key, tls_client_ca=ns.tls_client_ca,
                      tls_port=ns.tls_port, plain=not ns.no_plain, mode=ns.mode,
                      max_line=ns.max_line or DEFAULT_MAX_LINE, history=ns.history,
                      history_bytes=ns.history_bytes
                      or min(DEFAULT_HISTORY_BYTES, ns.max_queue_bytes // 4),
                      stats_interval=ns.stats_interval, metrics_port=ns.metrics_port,
                      metrics_host=ns.metrics_host)
    return run(options)


def _check_combinations(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Options that make no sense together: one line naming them, status 2."""
    if ns.redis is None:
        for value, option in ((ns.channel, "--channel"), (ns.redis_outbox, "--redis-outbox")):
            if value is not None:
                parser.error(f"{option} needs --redis")
    if bool(ns.tls_cert) != bool(ns.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not ns.tls_cert:
        for value, option in ((ns.tls_port, "--tls-port"), (ns.no_plain, "--no-plain"),
                              (ns.tls_client_ca, "--tls-client-ca")):
            if value:
                parser.error(f"{option} needs --tls-cert and --tls-key")
    if ns.no_plain and ns.tls_port is None:
        parser.error("--no-plain needs --tls-port (without it, --port speaks TLS only anyway)")
    if ns.tls_port is not None and ns.tls_port == ns.port and ns.port != 0:
        parser.error("--tls-port must differ from --port")
    if ns.metrics_host is not None and ns.metrics_port is None:
        parser.error("--metrics-host needs --metrics-port")
    if ns.metrics_port and ns.metrics_port in (ns.port, ns.tls_port):
        parser.error("--metrics-port must differ from --port and --tls-port")
    _check_chat(parser, ns)


def _check_chat(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.max_line is not None and ns.mode != "chat":
        parser.error("--max-line needs --mode chat")
    if ns.history_bytes is not None and not ns.history:
        parser.error("--history-bytes needs --history")
    if ns.history_bytes is not None and ns.history_bytes > ns.max_queue_bytes // 4:
        parser.error(f"--history-bytes ({ns.history_bytes}) must be at most a quarter of "
                     f"--max-queue-bytes ({ns.max_queue_bytes}), so that a newcomer does not "
                     "start congested")
    if ns.max_line is not None and ns.max_line > ns.max_queue_bytes // 8:
        parser.error(f"--max-line ({ns.max_line}) must be at most an eighth of "
                     f"--max-queue-bytes ({ns.max_queue_bytes}): a line may triple when it is "
                     "cleaned, and must still fit a reader's queue")


def build_diagrams_parser() -> argparse.ArgumentParser:
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
