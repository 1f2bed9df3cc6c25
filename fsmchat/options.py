"""The server's options, defined once: the ``Options`` it runs with and the ``OPTIONS`` catalogue.

``Options`` holds every setting with its default; nothing else spells a default. Each ``Option``
in ``OPTIONS`` names its flag, the ``Options`` field it fills, the parser that turns the text of
the command line into a value, its metavar, help and argparse group; its default is read from
``Options``. From the catalogue, ``cli`` builds argparse (``add_arguments``), ``read_config``
reads a TOML file (keys are the flags without their dashes: ``max-queue-bytes = "4M"``), and
``build`` makes the ``Options`` from what either gave.

Rules it keeps:
- A value means the same wherever it comes from: a file's value goes through the same parser
  as the command line's text (a TOML number or string alike), and the combination checks see
  the merged values, with the command line over the file.
- What was *given* is kept apart from the defaults, so "``--channel`` needs ``--redis``" holds
  however ``--channel`` was given, and a derived default (``history_bytes``, a quarter of
  ``max_queue_bytes`` at most) follows the values it derives from.
- Every mistake is a ``UsageError``: one line naming the option (and the file and key, for a
  file's), which the command line prints with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import math
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields, replace
from datetime import date, datetime, time
from typing import Any

from fsmchat.access import Network, parse_network
from fsmchat.chat.accounts import Accounts, AccountsError, JoinPassword, load, load_join_password
from fsmchat.chat.mode import DEFAULT_MAX_LINE, MAX_LINE_RANGE
from fsmchat.chat.recent import time_zone
from fsmchat.connection import RECV_SIZE
from fsmchat.net.loop import FD_SETSIZE
from fsmchat.ops.events import FORMATS, LEVELS
from fsmchat.ops.logstream import DEFAULT_LOG_BUFFER
from fsmchat.redis.link import RedisAddress

__all__ = [
    "DEFAULT_CHANNEL", "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_HISTORY_BYTES",
    "DEFAULT_MAX_CLIENTS_PER_ADDR", "DEFAULT_MAX_QUEUE_BYTES", "DEFAULT_REDIS_OUTBOX",
    "DEFAULT_STATS_INTERVAL", "GROUPS", "MAX_CLIENTS_CEILING", "MODES", "OPTIONS",
    "RESERVED_FDS", "WEB_FDS", "ConfigError", "Group", "Option", "Options", "UsageError",
    "add_arguments", "build", "from_command_line", "read_config",
]

RESERVED_FDS = 16
"""Descriptors kept out of --max-clients: stdio, the listener, the signal socket, a newcomer
being rejected, and room for the links to come (Redis, metrics)."""

WEB_FDS = 64
"""Descriptors the web port's HTTP connections may hold at once (``web.site.WEB_PLACES``): with
--web-port, kept out of the default --max-clients as well, so that they cost no chat seat."""

MAX_CLIENTS_CEILING = FD_SETSIZE - RESERVED_FDS

DEFAULT_MAX_QUEUE_BYTES = 4 * 1024 * 1024

DEFAULT_MAX_CLIENTS_PER_ADDR = 64
"""Clients one address may have connected at once (0: no limit). One host alone cannot fill
the server (it takes 16 addresses to fill 1,008 slots), while an office or a classroom behind
one NAT address still fits. Behind a proxy on the same machine every client has the proxy's
address: give 0 there."""

DEFAULT_CHANNEL = "fsmchat"

DEFAULT_HANDSHAKE_TIMEOUT = 10.0

DEFAULT_REDIS_OUTBOX = 8 * 1024 * 1024

DEFAULT_PRESENCE_TTL = 15.0
PRESENCE_TTL_RANGE = (1.0, 3600.0)

DEFAULT_HISTORY_BYTES = 1024 * 1024

DEFAULT_STATS_INTERVAL = 60.0

MODES = ("raw", "chat")


@dataclass(frozen=True, slots=True)
class Options:
    host: str | None = None  # None: every interface, IPv6 and IPv4 where the system allows
    port: int = 8080
    log_level: str = "debug"
    log_format: str = "auto"  # "auto": console when stdout is a terminal, else json
    log_buffer: int = DEFAULT_LOG_BUFFER
    drain_timeout: float = 5.0
    max_clients: int | None = None  # None: default_max_clients()
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    max_clients_per_addr: int = DEFAULT_MAX_CLIENTS_PER_ADDR  # 0: no limit
    reuse_port: bool = False
    redis: RedisAddress | None = None  # None: standalone
    channel: str = DEFAULT_CHANNEL
    redis_outbox: int = DEFAULT_REDIS_OUTBOX
    presence_ttl: float = DEFAULT_PRESENCE_TTL  # chat mode: a vanished instance's names, taken
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    idle_timeout: float = 0.0  # 0: never
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_recv_rate: int = 0  # bytes per second per client; 0: no limit
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_port: int | None = None  # None: with --tls-cert, the --port listener speaks TLS
    plain: bool = True  # with tls_port: also serve plain TCP on port
    redis_streams: bool = True  # with redis: keep each room's messages in a stream too
    mode: str = "raw"  # "raw": the byte relay; "chat": lines, names and commands
    max_line: int = DEFAULT_MAX_LINE  # chat mode: longest line, in bytes
    history: int = 0  # messages kept for late joiners; 0: none
    history_bytes: int = DEFAULT_HISTORY_BYTES  # build(): at most a quarter of max_queue_bytes
    history_file: str | None = None  # standalone: the history kept across restarts; None: not
    tz: str = "UTC"  # chat mode: the time zone of replayed history's times
    stats_interval: float = DEFAULT_STATS_INTERVAL  # seconds between server.stats; 0: never
    web_port: int | None = None  # None: no web page
    web_host: str | None = None  # None: the same as host
    web_origin: tuple[str, ...] = ()  # other sites whose pages may open the WebSocket
    metrics_port: int | None = None  # None: no metrics listener
    metrics_host: str | None = None  # None: the same as host
    accounts: Accounts | None = None  # chat mode: reserved names, read from --accounts FILE
    password: JoinPassword | None = None  # chat mode: everyone's join password, from a file


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Options)}


class UsageError(Exception):
    """A mistake in the options: one line naming the option, for status 2."""


class ConfigError(UsageError):
    """A mistake in the config file: its line names the file and the key."""


# -- the value parsers: text (from the command line, or a file's value as text) -> value ------


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


def _presence_ttl(text: str) -> float:
    value = _seconds(text)
    if not PRESENCE_TTL_RANGE[0] <= value <= PRESENCE_TTL_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}: expected {PRESENCE_TTL_RANGE[0]:g} to "
            f"{PRESENCE_TTL_RANGE[1]:g}")
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


def _origin(text: str) -> str:
    """``*``, or a web origin: ``http://`` or ``https://``, a host, maybe a port; no path."""
    text = text.strip().rstrip("/")
    if text == "*":
        return text
    scheme, _, rest = text.partition("://")
    host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if (scheme.lower() not in ("http", "https") or not host or "/" in rest
            or (port and not port.isdigit())):
        raise argparse.ArgumentTypeError(
            f"invalid origin {text!r}: write it as a browser does, scheme://host[:port], e.g. "
            "https://chat.example.org or http://localhost:8000 (or * for any)")
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


def _size_text(value: int) -> str:
    """A size as help shows it: ``4M`` for 4194304, the largest unit that divides it."""
    for unit in "GMK":
        if value and value % _UNITS[unit.lower()] == 0:
            return f"{value // _UNITS[unit.lower()]}{unit}"
    return str(value)


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


def _zone(text: str) -> str:
    try:
        time_zone(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time zone {text!r}: expected UTC or an IANA name such as Europe/Paris "
            "or America/New_York") from None
    return text


def _file(text: str) -> str:
    return text


def _history_file(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("invalid file '': give the path of a file")
    return text


def _accounts(text: str) -> Accounts:
    try:
        return load(text)
    except AccountsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _join_password(text: str) -> JoinPassword:
    try:
        return load_join_password(text)
    except AccountsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _no_file(value: object) -> str:
    return "none" if value is None else str(value)


# -- the catalogue ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    """An argparse group: a heading and a paragraph in --help (and in the docs)."""

    title: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Option:
    """One option. ``parse`` is None for a switch (it gives the field the opposite of its
    default); ``help`` may say ``%(default)s``, filled by ``text`` with ``show(default)``."""

    flag: str  # "--max-queue-bytes"
    field: str | None  # the Options field it fills; None: --config, which fills none
    parse: Callable[[str], Any] | None
    help: str
    metavar: str | None = None
    group: str | None = None  # a Group's title; None: the main list
    choices: tuple[str, ...] | None = None
    repeat: bool = False  # given again, it adds a value: a list in a file, a tuple in Options
    show: Callable[[Any], str] = str  # the default as help writes it

    @property
    def key(self) -> str:
        """The option's name in a config file: the flag without its dashes."""
        return self.flag.removeprefix("--")

    @property
    def default(self) -> Any:
        return None if self.field is None else _DEFAULTS[self.field]

    @property
    def text(self) -> str:
        """The help, with the default filled in."""
        return self.help % {"default": self.show(self.default)} if "%(" in self.help else self.help

    def from_file(self, value: object) -> Any:
        """A config file's value for this option; ArgumentTypeError if it is not one."""
        if self.parse is None:
            if not isinstance(value, bool):
                raise argparse.ArgumentTypeError(
                    f"expected true or false, not {_kind(value)}")
            return not self.default if value else self.default
        if self.repeat:
            items = value if isinstance(value, list) else [value]
            return [self._one(item) for item in items]
        return self._one(value)

    def _one(self, value: object) -> Any:
        assert self.parse is not None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise argparse.ArgumentTypeError(
                f"expected a string or a number, not {_kind(value)}")
        text = value if isinstance(value, str) else repr(value)
        if self.choices is not None and text not in self.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from "
                f"{', '.join(repr(choice) for choice in self.choices)})")
        return self.parse(text)


def _kind(value: object) -> str:
    """How a TOML value is called, for an error about it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return "a date or time"
    return f"{value!r}"


ACCESS = "access control"
TLS = "TLS"
SEVERAL = "several instances, one chat"
CHAT = "chat mode and history"
WEB = "the web page"
NUMBERS = "numbers for operators"

GROUPS: tuple[Group, ...] = (
    Group(ACCESS,
          "A client that is not allowed is accepted and closed at once (connection.rejected, "
          "reason denied). Deny wins over allow."),
    Group(TLS,
          "With --tls-cert and --tls-key, clients speak TLS: on --port, or on --tls-port beside "
          "the plain --port. One chat either way."),
    Group(SEVERAL,
          "Instances given the same --redis and --channel form one chat: what a client of one "
          "sends reaches the clients of all. Redis down: local chat goes on, the links retry."),
    Group(CHAT,
          "raw (the default) relays bytes as they come; chat makes the relay a chat for nc and "
          "telnet users: lines, names, /nick, /who, /me, /quit, join and leave notices, and "
          "control characters made harmless."),
    Group(WEB,
          "With --web-port, browsers join the same chat: the page at / talks to the server "
          "over a WebSocket at /ws, with the same limits as every client. HTTPS with "
          "--tls-cert."),
    Group(NUMBERS),
)

CONFIG = "--config"

OPTIONS: tuple[Option, ...] = (
    Option("--port", "port", _port,
           "TCP port to listen on; 0 picks a free one, reported in the server.started event "
           "(default: %(default)s)"),
    Option("--host", "host", _host,
           "address or host name to listen on (default: every interface, IPv6 and IPv4)",
           metavar="ADDR"),
    Option("--log-level", "log_level", str,
           "least important events shown: debug shows every read and write, info only the "
           "lifecycle (accepts, closes, start, stop), warning only problems "
           "(default: %(default)s)",
           choices=LEVELS),
    Option("--log-format", "log_format", str,
           "json: one JSON object per line, for jq and log aggregators; console: the same "
           "events for people; auto: console when stdout is a terminal, json otherwise "
           "(default: %(default)s)",
           choices=FORMATS),
    Option("--log-buffer", "log_buffer", _log_buffer,
           "most bytes of events waiting for a slow log reader; past half of it debug events "
           "are dropped, past three quarters info too, then everything, each counted and "
           "reported in a log.dropped event once the reader catches up. Takes K, M, G "
           "(default: %(default)s)",
           metavar="BYTES", show=_size_text),
    Option("--drain-timeout", "drain_timeout", _seconds,
           "on SIGINT/SIGTERM/SIGHUP, how long the stop may take: clients are read until they "
           "have nothing more (for at most half of it), then receive what is queued for them, "
           "then are closed anyway; a second signal closes them at once (default: %(default)s)",
           metavar="SECONDS"),
    Option("--max-clients", "max_clients", _clients,
           "most clients connected at once; more are accepted and closed at once (default: the "
           f"smaller of {FD_SETSIZE} and the descriptor limit, less {RESERVED_FDS}, and less "
           f"{WEB_FDS} more with --web-port; at most {MAX_CLIENTS_CEILING})",
           metavar="N"),
    Option("--max-clients-per-addr", "max_clients_per_addr", _per_addr,
           "most clients one address (an IPv4 address, an IPv6 /64) may have connected at "
           "once; more are accepted and closed at once (reason per_addr_limit); 0: no limit, as "
           "behind a proxy on this machine (default: %(default)s)",
           metavar="N"),
    Option("--max-queue-bytes", "max_queue_bytes", _bytes,
           "output limit per client: one whose queue would pass it is closed (reason "
           "queue_limit); over half of it, senders are paused until it catches up. Takes K, M, "
           "G (default: %(default)s)",
           metavar="BYTES", show=_size_text),
    Option("--reuse-port", "reuse_port", None,
           "set SO_REUSEPORT on the listener, so several instances (joined with --redis) can "
           "listen on one port; the kernel spreads new connections over them"),
    Option("--idle-timeout", "idle_timeout", _seconds,
           "close a client that sends nothing for this long (reason idle_timeout); 0 never does "
           "(default: %(default)s)",
           metavar="SECONDS", show="{:g}".format),
    Option("--max-recv-rate", "max_recv_rate", _rate,
           "most bytes per second one client may send; over it, the server stops reading it "
           "until it has credit again, so TCP slows it down: nothing is dropped. Takes K, M, G "
           "(default: no limit)",
           metavar="BYTES_PER_S"),
    Option(CONFIG, None, _file,
           "read options from this TOML file: each key an option's name without its dashes "
           "(max-queue-bytes = \"4M\", allow = [\"10.0.0.0/8\"], no-plain = true); an option "
           "given on the command line wins over the file's",
           metavar="FILE"),
    Option("--allow", "allow", _network,
           "let in only clients from these networks (repeatable; IPv4 or IPv6; default: "
           "everyone)",
           metavar="CIDR", group=ACCESS, repeat=True),
    Option("--deny", "deny", _network,
           "keep out clients from these networks (repeatable), even when --allow lets them in",
           metavar="CIDR", group=ACCESS, repeat=True),
    Option("--tls-cert", "tls_cert", _file,
           "the server's certificate (PEM, with any intermediates)",
           metavar="FILE", group=TLS),
    Option("--tls-key", "tls_key", _file, "its private key (PEM)", metavar="FILE", group=TLS),
    Option("--tls-port", "tls_port", _port,
           "serve TLS on this port, beside plain TCP on --port (default: --port itself speaks "
           "TLS)",
           metavar="PORT", group=TLS),
    Option("--no-plain", "plain", None, "with --tls-port: no plain TCP listener at all",
           group=TLS),
    Option("--tls-client-ca", "tls_client_ca", _file,
           "require a client certificate signed by this CA (mutual TLS): only people given one "
           "get in",
           metavar="FILE", group=TLS),
    Option("--handshake-timeout", "handshake_timeout", _seconds,
           "close a TLS client whose handshake takes longer (reason handshake_timeout; "
           "default: %(default)s)",
           metavar="SECONDS", group=TLS),
    Option("--redis", "redis", _redis_url,
           "join the chat through Redis pub/sub: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] "
           "(default: standalone)",
           metavar="URL", group=SEVERAL),
    Option("--channel", "channel", _channel,
           "the pub/sub channel, the same for every instance of one chat "
           "(default: %(default)s)",
           metavar="NAME", group=SEVERAL),
    Option("--no-redis-streams", "redis_streams", None,
           "pub/sub alone: no Redis stream per room, so no shared history, and what an "
           "instance misses while cut off from Redis is lost (redis.missed)",
           group=SEVERAL),
    Option("--redis-outbox", "redis_outbox", _bytes,
           "most bytes of messages waiting to be published while Redis is down or slow; past "
           "it the oldest is dropped (and counted). Takes K, M, G (default: %(default)s)",
           metavar="BYTES", group=SEVERAL, show=_size_text),
    Option("--presence-ttl", "presence_ttl", _presence_ttl,
           "chat mode: seconds the names of an instance that stopped refreshing them (killed, "
           "cut off from Redis) stay taken; each refreshes its own every third of that "
           "(default: %(default)s)",
           metavar="SECONDS", group=SEVERAL, show="{:g}".format),
    Option("--mode", "mode", str,
           "raw: every byte a client sends reaches every other client as it is; chat: lines, "
           "each shown as '<name> text' (default: %(default)s)",
           group=CHAT, choices=MODES),
    Option("--max-line", "max_line", _line_size,
           "chat mode: longest line; a longer one is cut into lines of this size, with a "
           "chat.line_cut warning. Takes K (default: %(default)s)",
           metavar="BYTES", group=CHAT, show=_size_text),
    Option("--history", "history", _history,
           "give a newcomer the last N messages (raw: what one recv returned; chat: lines "
           "everyone saw) before anything live; 0: none (default: %(default)s)",
           metavar="N", group=CHAT),
    Option("--history-bytes", "history_bytes", _some_bytes,
           "most bytes of history kept; the oldest go first. At most a quarter of "
           "--max-queue-bytes. Takes K, M, G (default: %(default)s, or a quarter of "
           "--max-queue-bytes if that is less)",
           metavar="BYTES", group=CHAT, show=_size_text),
    Option("--history-file", "history_file", _history_file,
           "standalone: keep the history in this file too, so that a restart still has it "
           "(made if missing, mode 0600; rewritten compactly now and then; a record torn by a "
           "crash is skipped). Not with --redis, whose streams keep it (default: none)",
           metavar="FILE", group=CHAT, show=_no_file),
    Option("--accounts", "accounts", _accounts,
           "chat mode: reserve the names of this file's accounts (NAME:HASH[:op] lines, made "
           "by fsmchat passwd NAME) for those who give the password: /nick NAME PASSWORD or "
           "/login NAME PASSWORD; accounts marked op may /kick, /mute and /topic. Read once, "
           "at the start (default: no accounts)",
           metavar="FILE", group=CHAT, show=_no_file),
    Option("--password", "password", _join_password,
           "chat mode: everyone must give the password in this file (its first line) before "
           "joining: /pass PASSWORD, or the password as the first line. Read once, at the "
           "start (default: none)",
           metavar="SECRET_FILE", group=CHAT, show=_no_file),
    Option("--tz", "tz", _zone,
           "chat mode: the time zone of the times (HH:MM) in front of replayed history, an "
           "IANA name such as Europe/Paris (default: %(default)s)",
           metavar="ZONE", group=CHAT),
    Option("--stats-interval", "stats_interval", _seconds,
           "log a server.stats event this often: connections by state, messages and bytes, "
           "queues, closes by reason, loop figures; 0: never (default: %(default)s)",
           metavar="SECONDS", group=NUMBERS, show="{:g}".format),
    Option("--web-port", "web_port", _port,
           "serve the chat's web page at http://HOST:PORT/ (https with --tls-cert), its "
           "browsers joining the same chat over a WebSocket, from the same select loop "
           "(0 picks a free port, reported in server.started; default: off)",
           metavar="PORT", group=WEB),
    Option("--web-host", "web_host", _host,
           "address to serve the web page on (default: --host)", metavar="ADDR", group=WEB),
    Option("--web-origin", "web_origin", _origin,
           "a site whose pages may open the chat's WebSocket besides the chat's own page, as "
           "scheme://host[:port] (repeatable; * for any; default: only the chat's own page)",
           metavar="ORIGIN", group=WEB, repeat=True),
    Option("--metrics-port", "metrics_port", _port,
           "serve Prometheus metrics at http://HOST:PORT/metrics, from the same select loop "
           "(same --host; 0 picks a free port, reported in server.started; default: off)",
           metavar="PORT", group=NUMBERS),
    Option("--metrics-host", "metrics_host", _host,
           "address to serve metrics on, e.g. 127.0.0.1 to keep them on this machine "
           "(default: --host)",
           metavar="ADDR", group=NUMBERS),
)

_BY_KEY = {option.key: option for option in OPTIONS}
_BY_FIELD = {option.field: option for option in OPTIONS if option.field is not None}


# -- argparse -----------------------------------------------------------------------------------

_GIVEN = "_given"
"""The namespace attribute where ``_Given`` notes each option given: field -> value."""


class _Given(argparse.Action):
    """Stores an option's value and notes it as given, so the file cannot override it."""

    def __init__(self, *args: Any, repeat: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.repeat = repeat

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        noted: dict[str, Any] = vars(namespace).setdefault(_GIVEN, {})
        if self.nargs == 0:
            value = self.const
        elif self.repeat:
            value = (*noted.get(self.dest, ()), values)
        else:
            value = values
        noted[self.dest] = value
        setattr(namespace, self.dest, value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of the catalogue, in its group; the namespace holds each default."""
    groups: dict[str | None, Any] = {None: parser}
    for group in GROUPS:
        groups[group.title] = parser.add_argument_group(group.title, group.description)
    for option in OPTIONS:
        kwargs: dict[str, Any] = {
            "action": _Given, "dest": option.field or "config", "default": option.default,
            "help": option.text.replace("%", "%%"), "repeat": option.repeat,
        }
        if option.parse is None:
            kwargs.update(nargs=0, const=not option.default)
        else:
            kwargs.update(type=option.parse, choices=option.choices, metavar=option.metavar)
        groups[option.group].add_argument(option.flag, **kwargs)


def from_command_line(namespace: argparse.Namespace) -> dict[str, Any]:
    """What the command line gave, by field (``config`` for --config's file)."""
    noted: dict[str, Any] = getattr(namespace, _GIVEN, {})
    return dict(noted)


# -- the config file ----------------------------------------------------------------------------


def read_config(path: str) -> dict[str, Any]:
    """What the TOML file at ``path`` gives, by field; ConfigError naming the file and key."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    values: dict[str, Any] = {}
    for key, value in table.items():
        option = _BY_KEY.get(key)
        if option is None:
            hint = (" (no [sections]: every option is a key at the top of the file)"
                    if isinstance(value, dict) else _did_you_mean(key))
            raise ConfigError(f"{path}: {key}: unknown option{hint}")
        if option.field is None:
            raise ConfigError(f"{path}: {key}: a config file cannot name another one; give "
                              f"{CONFIG} on the command line")
        try:
            values[option.field] = option.from_file(value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    return values


def _did_you_mean(key: str) -> str:
    near = difflib.get_close_matches(key.replace("_", "-"), list(_BY_KEY), n=1)
    return (f" (did you mean {near[0]}?)" if near else
            " (the keys are the options of --help, without their dashes)")


# -- from what was given to Options ---------------------------------------------------------


def build(values: Mapping[str, Any]) -> Options:
    """The Options from what was given (by field; the rest keep their defaults), checked."""
    values = {field: tuple(value) if _BY_FIELD[field].repeat else value
              for field, value in values.items()}
    options = Options(**values)
    _check_combinations(options, values.keys())
    if "history_bytes" not in values:
        options = replace(options, history_bytes=min(DEFAULT_HISTORY_BYTES,
                                                     options.max_queue_bytes // 4))
    return options


def _check_combinations(o: Options, given: Collection[str]) -> None:
    """Options that make no sense together: one line naming them."""
    if o.redis is None:
        for field in ("channel", "redis_outbox", "presence_ttl", "redis_streams"):
            if field in given:
                raise UsageError(f"{_BY_FIELD[field].flag} needs --redis")
    if "presence_ttl" in given and o.mode != "chat":
        raise UsageError("--presence-ttl needs --mode chat")
    if bool(o.tls_cert) != bool(o.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if not o.tls_cert:
        for value, flag in ((o.tls_port, "--tls-port"), (not o.plain, "--no-plain"),
                            (o.tls_client_ca, "--tls-client-ca")):
            if value:
                raise UsageError(f"{flag} needs --tls-cert and --tls-key")
    if not o.plain and o.tls_port is None:
        raise UsageError("--no-plain needs --tls-port (without it, --port speaks TLS only anyway)")
    if o.tls_port is not None and o.tls_port == o.port and o.port != 0:
        raise UsageError("--tls-port must differ from --port")
    if o.metrics_host is not None and o.metrics_port is None:
        raise UsageError("--metrics-host needs --metrics-port")
    if o.metrics_port and o.metrics_port in (o.port, o.tls_port):
        raise UsageError("--metrics-port must differ from --port and --tls-port")
    _check_web(o, given)
    _check_chat(o, given)


def _check_web(o: Options, given: Collection[str]) -> None:
    if o.web_port is None:
        for field in ("web_host", "web_origin"):
            if field in given:
                raise UsageError(f"{_BY_FIELD[field].flag} needs --web-port")
    elif o.web_port and o.web_port in (o.port, o.tls_port, o.metrics_port):
        raise UsageError("--web-port must differ from --port, --tls-port and --metrics-port")


def _check_chat(o: Options, given: Collection[str]) -> None:
    for field in ("accounts", "password"):
        if field in given and o.mode != "chat":
            raise UsageError(f"{_BY_FIELD[field].flag} needs --mode chat")
    if "max_line" in given and o.mode != "chat":
        raise UsageError("--max-line needs --mode chat")
    if "tz" in given and o.mode != "chat":
        raise UsageError("--tz needs --mode chat")
    if "history_bytes" in given and not o.history:
        raise UsageError("--history-bytes needs --history")
    if o.history_file is not None and o.redis is not None:
        raise UsageError("--history-file cannot go with --redis: with Redis, the streams keep "
                         "the history (drop --history-file)")
    if o.history_file is not None and not o.history:
        raise UsageError("--history-file needs --history")
    if "history_bytes" in given and o.history_bytes > o.max_queue_bytes // 4:
        raise UsageError(f"--history-bytes ({o.history_bytes}) must be at most a quarter of "
                         f"--max-queue-bytes ({o.max_queue_bytes}), so that a newcomer does not "
                         "start congested")
    if "max_line" in given and o.max_line > o.max_queue_bytes // 8:
        raise UsageError(f"--max-line ({o.max_line}) must be at most an eighth of "
                         f"--max-queue-bytes ({o.max_queue_bytes}): a line may triple when it is "
                         "cleaned, and must still fit a reader's queue")
