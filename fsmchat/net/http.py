"""HTTP/1.1 over the one select loop: what the metrics port and the web port share.

Each HTTP connection is a model of ``lifecycle.HTTP`` (accepted -> [handshaking] -> receiving ->
responding -> receiving ... -> closed). Bytes read are fed to ``h11``, which parses them without
doing any I/O; a whole request fires ``request``, whose action queues the site's answer, or
``upgrade``, which hands the socket to the chat as a WebSocket client. The socket is written
only when select says it is writable, like a chat client's. Keep-alive works, so a Prometheus
server scrapes, and a browser loads a page, over one connection.

A ``Site`` says what each request gets (``answer``) and which ones leave HTTP (``upgrade``); this
module owns the protocol around it.

Rules it keeps:
- A request h11 cannot parse is answered 400 (or h11's hint, 431 for huge headers) and that
  connection closes. Nothing a client sends here reaches the chat but through ``upgrade``.
- At most ``Site.places`` connections at once. A new one has ``REQUEST_TIMEOUT`` seconds (plus
  the handshake's time under TLS) to send a whole request, a kept-alive one
  ``KEEPALIVE_TIMEOUT`` for its next: a stuck or hostile client costs a descriptor for a while,
  no more.
- A real request always gets in: when every place is taken, a newcomer takes the place of the
  connection that has waited longest for a request (one that never sent a whole request
  first, then an idle keep-alive one). Only when all of them are being answered is it ``busy``.
- A bug closes that connection only (``sock.LoopSocket`` contains it), never the chat.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import HTTP, HttpState, HttpTrigger
from fsmchat.net.loop import EventLoop, FdLimit, Timer
from fsmchat.net.sock import LoopSocket
from fsmchat.reasons import Reason

REQUEST_TIMEOUT = 5.0
"""Seconds a new connection may take to send a whole request: a scraper or a browser sends it at
once, so only a stuck or hostile one needs more."""

KEEPALIVE_TIMEOUT = 30.0
"""Seconds a kept-alive connection may wait for its next whole request: more than a scrape
interval (Prometheus's default is 15 s), so a scraper keeps its connection between scrapes."""

RECV_SIZE = 16 * 1024

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a request gets: a status, its headers, its body (sent for GET, not for HEAD)."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    close: bool = False  # the connection closes after it

    @classmethod
    def plain(cls, status: int, text: str = "", headers: Headers | None = None,
              close: bool = False) -> Answer:
        """A short text/plain answer: ``text``, or the status and its phrase."""
        body = (text or f"{status} {HTTPStatus(status).phrase}") + "\n"
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])],
                   body.encode(), close)


class Site:
    """What one listener serves; a subclass answers requests (and may take some over)."""

    name = "http"
    """The ``site`` field of the http.* events: ``metrics`` or ``web``."""

    def __init__(self, loop: EventLoop, log: FilteringBoundLogger, *, places: int,
                 tls: ssl.SSLContext | None = None, handshake_timeout: float = 0.0) -> None:
        self.loop = loop
        self.log = log
        self.places = places
        self.tls = tls
        self.first_timeout = REQUEST_TIMEOUT + (handshake_timeout if tls is not None else 0.0)
        self.clients: dict[int, HttpConnection] = {}

    # -- what a site decides ---------------------------------------------------------------------

    def answer(self, request: h11.Request, conn: HttpConnection) -> Answer:
        """The answer to a whole request (``method`` is GET or HEAD or anything else)."""
        raise NotImplementedError

    def upgrade(self, request: h11.Request, conn: HttpConnection) -> bool:
        """Whether ``request`` leaves HTTP (then ``take_over`` gets the socket); a site that
        refuses it answers it instead, through ``answer``."""
        return False

    def take_over(self, conn: HttpConnection, trailing: bytes) -> None:
        """The socket of ``conn`` (out of the loop now) is the site's, with the bytes the client
        sent after its request."""
        raise NotImplementedError

    # -- connections -----------------------------------------------------------------------------

    def admit(self, sock: socket.socket, peer: str, host: str = "", *,
              allowed: bool = True) -> None:
        """Serve a client, or close it at once: not allowed (``--allow``/``--deny``), every
        place taken by one being answered, or a descriptor select cannot watch."""
        client = None
        reason = Reason.DENIED
        if allowed:
            try:
                client = HttpConnection(sock, peer, host, self)
            except FdLimit:
                reason = Reason.FD_LIMIT
        if client is not None and len(self.clients) >= self.places and not self._make_room():
            client.close()
            client, reason = None, Reason.BUSY
        if client is None:
            self.log.warning("http.rejected", site=self.name, peer=peer, reason=reason)
            sock.close()
            return
        self.clients[client.fd] = client
        client.fire_safely(HttpTrigger.SECURE if client.tls else HttpTrigger.START)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        waiting = [client for client in self.clients.values()
                   if client.state in (HttpState.RECEIVING, HttpState.HANDSHAKING)]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda client: (client.served > 0, client.waiting_since))
        self.log.warning("http.evicted", site=self.name, peer=oldest.peer, served=oldest.served,
                         seconds=round(time.monotonic() - oldest.waiting_since, 3))
        oldest.fire_safely(HttpTrigger.FAIL)
        return True

    def close_all(self) -> None:
        for client in list(self.clients.values()):
            client.fire_safely(HttpTrigger.FAIL)


class HttpConnection(LoopSocket, lifecycle=HTTP):
    sock: socket.socket  # always set: it is attached from the start
    recv_size = RECV_SIZE

    def __init__(self, sock: socket.socket, peer: str, host: str, site: Site) -> None:
        """Raises ``loop.FdLimit`` for a descriptor select cannot watch (nothing is kept)."""
        super().__init__(site.loop, site.log, peer)
        sock.setblocking(False)
        self.attach(sock, read=False)
        self.host = host  # the client's address, without the port
        self.site = site
        self.http = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.error: h11.RemoteProtocolError | None = None
        self.served = 0  # responses sent on this connection
        self.bytes_in = 0  # read from it (what a WebSocket it becomes counts as its own)
        self.waiting_since = time.monotonic()  # when its wait for the current request began
        self.timer: Timer = site.loop.call_later(site.first_timeout, self._timed_out)
        self.machine.add_model(self)

    def _timed_out(self) -> None:
        """No whole request in time (a bug here is contained by the loop, like a handler's)."""
        if self.state != HttpState.CLOSED:
            self.fire(HttpTrigger.FAIL)

    # -- the socket base's hooks ------------------------------------------------------------------

    def failed(self, op: str, exc: OSError) -> None:
        self.fire(HttpTrigger.FAIL)

    def abandon(self) -> None:
        """After a bug: close at once, by hand (the table may be what is broken)."""
        if self.state != HttpState.CLOSED:
            self.close()

    def bug_fields(self) -> dict[str, str]:
        return {"link": self.site.name}

    # -- actions, named by lifecycle.HTTP_TRANSITIONS -------------------------------------------

    def await_request(self) -> None:
        self.loop.want_read(self.fd, True)

    def shake(self) -> None:
        if self.handshake_step():
            self.fire(HttpTrigger.ESTABLISHED)

    def receive(self) -> None:
        data = self.recv_some()
        if data is None:
            return
        if not data:
            self.fire(HttpTrigger.FAIL)
            return
        self.bytes_in += len(data)
        self.http.receive_data(data)
        self._parse()

    def _parse(self) -> None:
        """Take h11's events: a whole request (or a bad one) fires ``request`` or ``upgrade``."""
        try:
            while True:
                event = self.http.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    if self.request is not None:  # a body still to come: answer, then close
                        break
                    return
                if isinstance(event, h11.Request):
                    self.request = event
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    self.fire(HttpTrigger.FAIL)
                    return
        except h11.RemoteProtocolError as exc:
            self.error = exc
            self.log.warning("http.bad_request", site=self.site.name, peer=self.peer,
                             error=str(exc))
        if self.error is None and self.request is not None and self.site.upgrade(self.request,
                                                                                  self):
            self.fire(HttpTrigger.UPGRADE)
        else:
            self.fire(HttpTrigger.REQUEST)

    def respond(self) -> None:
        request, self.request = self.request, None
        method, target = b"", b""
        if self.error is not None or request is None:
            status = self.error.error_status_hint if self.error is not None else 400
            answer = Answer.plain(status, close=True)
        else:
            method, target = request.method, request.target
            answer = self.site.answer(request, self)
        headers = [*answer.headers, ("Content-Length", str(len(answer.body)))]
        if answer.close:
            headers.append(("Connection", "close"))
        self.log.debug("http.request", site=self.site.name, fd=self.fd, method=method.decode(),
                       target=target.decode("ascii", "replace"), status=answer.status)
        http = self.http
        head = http.send(h11.Response(status_code=answer.status, headers=headers,
                                      reason=HTTPStatus(answer.status).phrase))
        body = b"" if method == b"HEAD" else answer.body
        for part in (head, http.send(h11.Data(data=body)) if body else b"",
                     http.send(h11.EndOfMessage())):
            if part:
                self.push(part)
        self.loop.want_read(self.fd, False)

    def flush(self) -> None:
        if self.send_queued() is None or self.queue:
            return
        http = self.http
        self.served += 1
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
            self.fire(HttpTrigger.SENT)
        else:
            self.fire(HttpTrigger.DONE)

    def next_request(self) -> None:
        self.timer.cancel()
        self.timer = self.loop.call_later(KEEPALIVE_TIMEOUT, self._timed_out)
        self.waiting_since = time.monotonic()
        self.loop.want_read(self.fd, True)
        self._parse()  # a pipelined request may be waiting in h11 already

    def hand_over(self) -> None:
        """Out of the loop and of this table; the socket, still open, goes to the site."""
        self.timer.cancel()
        self.unwatch()
        self.machine.remove_model(self)
        self.site.clients.pop(self.fd, None)
        trailing, _ = self.http.trailing_data
        self.site.take_over(self, bytes(trailing))

    def close(self) -> None:
        self.timer.cancel()
        self.close_socket()
        self.machine.remove_model(self)
        self.site.clients.pop(self.fd, None)
