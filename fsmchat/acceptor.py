"""The acceptor: listeners, who may come in, the sockets' options, and the descriptor back-off.

A readable listener means ``accept``, in a bounded batch so that a connect storm cannot starve
the chat; each socket it takes is admitted into the hub as a ``Connection`` or turned away at
once with ``connection.rejected``. The metrics listener is accepted from the same way and
handed to the metrics endpoint.

Rules it keeps:
- A newcomer is turned away (accepted and closed at once) when ``--allow``/``--deny`` keep its
  address out, past ``max_clients_per_addr`` from its address, past ``max_clients``, when its
  socket fails while it is being taken in (a reset before TLS could begin), or for a descriptor
  the loop refuses (at or above FD_SETSIZE): that client only, never the loop.
- In chat mode a newcomer turned away hears why (``refusal_line``): one ``*** `` line in a
  single non-blocking send on the fresh socket, then the close; it never blocks and is never
  retried (the socket's buffer is empty: it fits). Not on a TLS listener: plain text before a
  handshake is noise to a TLS client, and a handshake for a client the chat will not take is
  the work the refusal saves (the web port says it on the WebSocket: ``web.site``). Raw mode
  says nothing, as the relay always did.
- Every client socket is non-blocking, without Nagle (no message waits on a timer), with TCP
  keepalive (a peer that vanished without a FIN is found without chat traffic).
- TLS handshakes under way take at most a quarter of ``max_clients``: a newcomer past that
  closes the oldest unfinished one (``handshake_limit``), so stalled handshakes can neither take
  the chat's seats nor keep a real TLS client out.
- Running out of descriptors pauses accepting for a moment (or until a connection closes)
  instead of spinning on a listener that stays readable, and says so once per episode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from functools import partial

from structlog.typing import FilteringBoundLogger

from fsmchat.access import Access, address_key
from fsmchat.connection import Connection
from fsmchat.hub import Extension, Hub
from fsmchat.lifecycle import State, Trigger
from fsmchat.net.http import Site
from fsmchat.net.loop import EventLoop, FdLimit, Reader, Timer
from fsmchat.reasons import Reason, error_reason

ACCEPT_BATCH = 64
"""Connections accepted per readable listener event, so a connect storm cannot starve chat."""

ACCEPT_RETRY = 0.25
"""Seconds the listener rests after accept ran out of descriptors or memory."""

KEEPALIVE_IDLE = 300
"""Seconds of silence before TCP probes a client (then every 30 s, 4 times): a peer that
vanished without a FIN or RST is found without any chat traffic."""

CLIENT_OPTIONS: tuple[tuple[int, int, int], ...] = (
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *(((socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
       (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 30),
       (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4))
      if hasattr(socket, "TCP_KEEPIDLE") else ()),  # Linux; elsewhere the system's defaults
)
"""(level, option, value) of every client's TCP socket: no Nagle (no message waits on a timer),
and keepalive."""

_TCP = (socket.AF_INET, socket.AF_INET6)

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

Listener = tuple[socket.socket, ssl.SSLContext | None]
"""A listening socket, and the TLS context its clients are served with (None: plain TCP)."""

Take = Callable[[socket.socket, object, "ClientOptions"], None]
"""What a listener's accepted sockets go to: (socket, address, what sets their options)."""


class Acceptor(Extension):
    """An extension of the hub too: a TLS client that joins the chat has finished its handshake."""

    def __init__(self, listeners: list[Listener], hub: Hub, access: Access, *,
                 max_clients: int, max_clients_per_addr: int) -> None:
        self.listeners = listeners
        self.hub = hub
        self.loop: EventLoop = hub.loop
        self.log: FilteringBoundLogger = hub.log
        self.access = access
        self.max_clients = max_clients
        self.max_clients_per_addr = max_clients_per_addr  # 0: no limit
        self.max_handshakes = max(1, max_clients // 4)
        self.per_addr: Counter[str] = Counter()  # address_key -> connections now
        self._address: dict[int, str] = {}  # fd -> its address_key
        self._handshakes: dict[int, Connection] = {}  # TLS, not yet in the chat; oldest first
        self._listening: list[socket.socket] = []  # every listener, the metrics one too
        self._timer: Timer | None = None  # set while accepting is paused
        self._failures = 0  # failed accepts in the current episode
        self.closed = False
        for listener, tls in listeners:
            self.listen(listener, partial(self._take_client, tls))

    def listen(self, listener: socket.socket, take: Take) -> None:
        """Accept from ``listener`` in the loop, and hand each socket to ``take``."""
        self._listening.append(listener)
        options = ClientOptions(listener)
        self.loop.register(listener.fileno(),
                           Reader(partial(self._accept, listener, take, options)))

    def serve(self, listener: socket.socket, site: Site) -> None:
        """Accept from ``listener`` for an HTTP site (the metrics, the web page); the chat's
        ``--allow``/``--deny`` apply there too."""
        self.listen(listener, partial(self._take_http, site))

    def _take_http(self, site: Site, sock: socket.socket, address: object,
                   options: ClientOptions) -> None:
        peer = format_peer(address)
        host = address[0] if isinstance(address, tuple) else ""
        if self.permits(address):
            try:
                sock = prepare(sock, site.tls, options)
            except OSError as exc:  # gone already
                reason = Reason.TLS_ERROR if isinstance(exc, ssl.SSLError) else error_reason(exc)
                self.log.warning("http.rejected", site=site.name, peer=peer, reason=reason)
                sock.close()
                return
            site.admit(sock, peer, host)
        else:
            site.admit(sock, peer, host, allowed=False)

    def close(self) -> None:
        """Accept no more: the listeners are closed."""
        self.closed = True
        for listener in self._listening:
            self.loop.unregister(listener.fileno())
            listener.close()
        if self._timer is not None:
            self._timer.cancel()

    def _accept(self, listener: socket.socket, take: Take, options: ClientOptions) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone, try the next
            if self._failures:
                self.log.info("accept.resumed", failures=self._failures)
                self._failures = 0
            take(sock, address, options)

    def _take_client(self, tls: ssl.SSLContext | None, sock: socket.socket, address: object,
                     options: ClientOptions) -> None:
        self.admit(sock, format_peer(address), tls,
                   address[0] if isinstance(address, tuple) else "", options)

    def permits(self, address: object) -> bool:
        """Whether ``--allow``/``--deny`` let a peer at ``address`` in."""
        host = address[0] if isinstance(address, tuple) else ""
        return self.access.open or self.access.permits(host)

    def refusal(self, host: str) -> str:
        """Why a newcomer from ``host`` is turned away (a ``Reason``), or "" if it may come in."""
        if not self.access.open and not self.access.permits(host):
            return Reason.DENIED
        if 0 < self.max_clients_per_addr <= self.per_addr[address_key(host)]:
            return Reason.PER_ADDR_LIMIT
        if len(self.hub.connections) >= self.max_clients:
            return Reason.SERVER_FULL
        return ""

    def admit(self, sock: socket.socket, peer: str, tls: ssl.SSLContext | None = None,
              host: str = "", options: ClientOptions | None = None) -> None:
        """Take an accepted socket into the hub, or turn it away: not allowed, no room, or gone
        before it could be taken in (a reset before TLS began). ``options``: its listener's
        (by default they are set on this socket)."""
        reason = self.refusal(host)
        if not reason:
            try:
                sock = prepare(sock, tls, options or ClientOptions())
            except OSError as exc:  # gone already: that client only, never the loop
                reason = Reason.TLS_ERROR if isinstance(exc, ssl.SSLError) else error_reason(exc)
        if not reason:
            try:
                conn = Connection(sock, peer, self.hub)  # in the loop, not yet read from
            except FdLimit:  # a descriptor select cannot watch
                reason = Reason.FD_LIMIT
        if reason:
            self.turn_away(sock, peer, reason, host, say=tls is None)
            return
        self.seat(conn, host, Trigger.START if tls is None else Trigger.SECURE)

    def turn_away(self, sock: socket.socket, peer: str, reason: str, host: str = "", *,
                  say: bool = False) -> None:
        """Counted, said, closed; in chat mode with ``say`` (a plain socket), told why first."""
        self.refused(peer, reason)
        line = self.refusal_line(reason, host) if say and self.hub.chat_mode else b""
        if line:
            with contextlib.suppress(OSError):  # full or gone: the close is the answer
                sock.setblocking(False)
                sock.send(line)
        sock.close()

    def refusal_line(self, reason: str, host: str) -> bytes:
        """What a newcomer turned away for ``reason`` reads, as one ``*** `` line (b"" for one
        that is gone already)."""
        if reason == Reason.SERVER_FULL:
            count = self.max_clients
            return b"*** the chat is full (%d %s); try again later\n" % (
                count, b"person" if count == 1 else b"people")
        if reason == Reason.PER_ADDR_LIMIT:
            return (b"*** too many connections from your address (%d at most); close one and "
                    b"try again\n" % self.max_clients_per_addr)
        if reason == Reason.DENIED:
            shown = host[7:] if host.startswith("::ffff:") and "." in host else host
            where = b" (%s)" % shown.encode("ascii", "replace") if shown else b""
            return b"*** not allowed from your address%s\n" % where
        if reason == Reason.FD_LIMIT:
            return b"*** the server cannot take another connection now; try again later\n"
        return b""

    def refused(self, peer: str, reason: str) -> None:
        """A newcomer turned away: counted and said (the web port answers it in words)."""
        self.hub.counts.rejected[str(reason)] += 1  # the plain string: a JSON key and a label
        self.log.warning("connection.rejected", peer=peer, reason=reason)

    def seat(self, conn: Connection, host: str, trigger: str) -> None:
        """A connection the hub takes (``refusal`` let it in): counted, then ``trigger``
        (``start``, ``secure`` or, from the web port, ``upgrade``) sets it going."""
        hub = self.hub
        fd = conn.fd
        address = address_key(host)
        hub.connections[fd] = conn
        self.per_addr[address] += 1
        self._address[fd] = address
        if trigger == Trigger.SECURE:
            self._make_room_for_handshake()
            self._handshakes[fd] = conn
        hub.counts.accepted += 1
        if trigger == Trigger.UPGRADE:
            hub.events.accepted(fd, conn.peer, conn.tls, web=True)
        else:
            hub.events.accepted(fd, conn.peer, trigger == Trigger.SECURE)
        conn.fire_safely(trigger)

    def _make_room_for_handshake(self) -> None:
        """At ``max_handshakes`` unfinished TLS handshakes, close the oldest one still going."""
        if len(self._handshakes) < self.max_handshakes:
            return
        for conn in self._handshakes.values():  # (one that failed is released after the turn)
            if conn.state == State.HANDSHAKING:
                self.log.warning("connection.tls_error", fd=conn.fd, peer=conn.peer,
                                 error=f"the oldest of {self.max_handshakes} unfinished "
                                       "handshakes, the most at once (a quarter of "
                                       "--max-clients), closed for a newcomer")
                conn.close_safely(Reason.HANDSHAKE_LIMIT)
                return

    def greet(self, conn: Connection) -> None:
        """A client joined the chat: its handshake, if it had one, is over."""
        self._handshakes.pop(conn.fd, None)

    def unseat(self, conn: Connection) -> None:
        """A connection is gone: its address has room for one more, and accepting may go on."""
        fd = conn.fd
        self._handshakes.pop(fd, None)
        address = self._address.pop(fd)
        self.per_addr[address] -= 1
        if not self.per_addr[address]:
            del self.per_addr[address]
        if self._timer is not None:
            self._resume()

    def _pause(self, exc: OSError) -> None:
        for listener in self._listening:
            self.loop.want_read(listener.fileno(), False)
        if self._timer is None:
            self._timer = self.loop.call_later(ACCEPT_RETRY, self._resume)
        if not self._failures:
            self.log.warning("accept.failed", error=f"{errno.errorcode.get(exc.errno or 0)}: "
                             f"{exc.strerror}", retry_in=ACCEPT_RETRY)
        self._failures += 1

    def _resume(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed:
            for listener in self._listening:
                self.loop.want_read(listener.fileno(), True)


def prepare(sock: socket.socket, tls: ssl.SSLContext | None,
            options: ClientOptions) -> socket.socket:
    """Non-blocking, no Nagle, keepalive, and TLS if asked: OSError if the client is gone."""
    sock.setblocking(False)
    options.apply(sock)
    if tls is not None:
        _still_connected(sock)
        sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return sock


class ClientOptions:
    """``CLIENT_OPTIONS`` on a listener's sockets: set on each one, or found there already.

    Linux copies a listener's socket options to every socket accepted from it, so the listener
    is given them, and its first TCP socket is checked: if that one came with all of them, the
    others are trusted to (five system calls fewer per connection); if not (another system),
    each is set as it comes."""

    __slots__ = ("inherited",)

    def __init__(self, listener: socket.socket | None = None) -> None:
        self.inherited: bool | None = False  # None: the listener's first socket will tell
        if listener is not None and listener.family in _TCP:
            with contextlib.suppress(OSError):  # then set on each socket, as without a listener
                set_options(listener)
                self.inherited = None

    def apply(self, sock: socket.socket) -> None:
        """``CLIENT_OPTIONS`` on ``sock`` (a TCP one): OSError if the client is gone."""
        if self.inherited or sock.family not in _TCP:
            return
        if self.inherited is None:
            self.inherited = all(sock.getsockopt(level, option) == value
                                 for level, option, value in CLIENT_OPTIONS)
            if self.inherited:
                return
        set_options(sock)


def set_options(sock: socket.socket) -> None:
    for level, option, value in CLIENT_OPTIONS:
        sock.setsockopt(level, option, value)


def _still_connected(sock: socket.socket) -> None:
    """OSError (ECONNRESET, say) if the client is gone already.

    ``wrap_socket`` would find it out too, but its error leaves a half-made SSLSocket holding
    the descriptor until the garbage collector gets to it; this closes it at once."""
    try:
        sock.getpeername()
    except OSError as exc:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or exc.errno or 0
        raise OSError(code, os.strerror(code)) from None


def format_peer(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on a dual-stack listener
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) or "unnamed"


class ListenError(Exception):
    """The listener could not be set up; ``usage`` is True when the host itself is bad."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def open_listener(host: str | None, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listener; ``reuse_port`` lets other processes listen on the same port."""
    try:
        if host is None:
            try:
                sock = socket.create_server(("::", port), family=socket.AF_INET6,
                                            dualstack_ipv6=True, backlog=socket.SOMAXCONN,
                                            reuse_port=reuse_port)
            except (OSError, ValueError):  # no IPv6 here: every IPv4 interface then
                sock = socket.create_server(("0.0.0.0", port), backlog=socket.SOMAXCONN,
                                            reuse_port=reuse_port)
        else:
            family, _, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.create_server(address[:2], family=family, backlog=socket.SOMAXCONN,
                                        reuse_port=reuse_port)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve --host {host!r}: {exc.strerror}", usage=True) from None
    except OSError as exc:
        where = f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
