"""``GET /metrics`` over HTTP/1.1, served by the same select loop as the chat.

Each scraper's connection is a model of ``lifecycle.METRICS_HTTP`` (receiving -> responding ->
receiving ... -> closed). Bytes read are fed to ``h11``, which parses them without doing any I/O;
a whole request fires ``request``, whose action routes it and queues the response; the socket is
written only when select says it is writable, like a chat client's. Keep-alive works, so a
Prometheus server scrapes over one connection.

Rules it keeps:
- ``GET``/``HEAD /metrics`` answer 200 with the exposition; another path 404; another method on
  it 405 (with ``Allow``); a request h11 cannot parse 400 (or h11's hint, 431 for huge headers),
  and that connection closes. Nothing a scraper sends can reach the chat.
- At most ``MAX_SCRAPERS`` connections at once. A new one has ``REQUEST_TIMEOUT`` seconds to
  send a whole request, a kept-alive one ``KEEPALIVE_TIMEOUT`` for its next: a stuck or hostile
  scraper costs a descriptor for a while, no more.
- A real scrape always gets in: when every place is taken, a newcomer takes the place of the
  connection that has waited longest for a request (one that never sent a whole request
  first, then an idle keep-alive one). Only when all of them are being answered is it ``busy``.
- The chat's ``--allow``/``--deny`` apply here too.
- A bug closes that scraper only (``sock.LoopSocket`` contains it), never the chat.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from http import HTTPStatus

import h11
from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import METRICS_HTTP, HttpState, HttpTrigger
from fsmchat.net.loop import EventLoop, FdLimit, Timer
from fsmchat.net.sock import LoopSocket
from fsmchat.reasons import Reason

PATH = b"/metrics"
MAX_SCRAPERS = 4
"""Metrics connections open at once; more are accepted and closed at once."""

REQUEST_TIMEOUT = 5.0
"""Seconds a new metrics connection may take to send a whole request: a scraper sends it at
once, so only a stuck or hostile one needs more."""

KEEPALIVE_TIMEOUT = 30.0
"""Seconds a kept-alive connection may wait for its next whole request: more than a scrape
interval (Prometheus's default is 15 s), so a scraper keeps its connection between scrapes."""

RECV_SIZE = 16 * 1024


class MetricsEndpoint:
    """The metrics listener's clients and what they are answered with."""

    def __init__(self, loop: EventLoop, log: FilteringBoundLogger,
                 render: Callable[[], bytes], content_type: str) -> None:
        self.loop = loop
        self.log = log
        self.render = render
        self.content_type = content_type
        self.scrapers: dict[int, MetricsConnection] = {}

    def admit(self, sock: socket.socket, peer: str, *, allowed: bool = True) -> None:
        """Serve a scraper, or close it at once: not allowed (``--allow``/``--deny``), every
        place taken by one being answered, or a descriptor select cannot watch."""
        scraper = None
        reason = Reason.DENIED
        if allowed:
            try:
                scraper = MetricsConnection(sock, peer, self)
            except FdLimit:
                reason = Reason.FD_LIMIT
        if scraper is not None and len(self.scrapers) >= MAX_SCRAPERS and not self._make_room():
            scraper.close()
            scraper, reason = None, Reason.BUSY
        if scraper is None:
            self.log.warning("metrics.rejected", peer=peer, reason=reason)
            sock.close()
            return
        sock.setblocking(False)
        self.scrapers[scraper.fd] = scraper

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        waiting = [scraper for scraper in self.scrapers.values()
                   if scraper.state == HttpState.RECEIVING]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda scraper: (scraper.served > 0, scraper.waiting_since))
        self.log.warning("metrics.evicted", peer=oldest.peer, served=oldest.served,
                         seconds=round(time.monotonic() - oldest.waiting_since, 3))
        oldest.fire_safely(HttpTrigger.FAIL)
        return True

    def close_all(self) -> None:
        for scraper in list(self.scrapers.values()):
            scraper.fire_safely(HttpTrigger.FAIL)


class MetricsConnection(LoopSocket, lifecycle=METRICS_HTTP):
    sock: socket.socket  # always set: it is attached from the start
    recv_size = RECV_SIZE

    def __init__(self, sock: socket.socket, peer: str, endpoint: MetricsEndpoint) -> None:
        """Raises ``loop.FdLimit`` for a descriptor select cannot watch (nothing is kept)."""
        super().__init__(endpoint.loop, endpoint.log, peer)
        self.attach(sock)
        self.endpoint = endpoint
        self.http = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.error: h11.RemoteProtocolError | None = None
        self.served = 0  # responses sent on this connection
        self.waiting_since = time.monotonic()  # when its wait for the current request began
        self.timer: Timer = endpoint.loop.call_later(REQUEST_TIMEOUT, self._timed_out)
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
        return {"link": "metrics"}

    # -- actions, named by lifecycle.HTTP_TRANSITIONS -------------------------------------------

    def receive(self) -> None:
        data = self.recv_some()
        if data is None:
            return
        if not data:
            self.fire(HttpTrigger.FAIL)
            return
        self.http.receive_data(data)
        self._parse()

    def _parse(self) -> None:
        """Take h11's events: a whole request (or a bad one) fires ``request``."""
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
            self.endpoint.log.warning("metrics.bad_request", peer=self.peer, error=str(exc))
        self.fire(HttpTrigger.REQUEST)

    def respond(self) -> None:
        request, self.request = self.request, None
        loop = self.endpoint.loop
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        body = b""
        if self.error is not None or request is None:
            status = self.error.error_status_hint if self.error is not None else 400
            headers.append(("Connection", "close"))
            method, target = b"", b""
        else:
            method, target = request.method, request.target.split(b"?", 1)[0]
            if target != PATH:
                status = 404
            elif method not in (b"GET", b"HEAD"):
                status = 405
                headers.append(("Allow", "GET, HEAD"))
            else:
                status = 200
                headers = [("Content-Type", self.endpoint.content_type)]
                body = self.endpoint.render()
        if status != 200:
            body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        headers.append(("Content-Length", str(len(body))))
        self.endpoint.log.debug("metrics.request", fd=self.fd, method=method.decode(),
                                target=target.decode("ascii", "replace"), status=status)
        http = self.http
        head = http.send(h11.Response(status_code=status, headers=headers,
                                      reason=HTTPStatus(status).phrase))
        if method == b"HEAD":
            body = b""
        for part in (head, http.send(h11.Data(data=body)) if body else b"",
                     http.send(h11.EndOfMessage())):
            if part:
                self.push(part)
        loop.want_read(self.fd, False)

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
        self.timer = self.endpoint.loop.call_later(KEEPALIVE_TIMEOUT, self._timed_out)
        self.waiting_since = time.monotonic()
        self.endpoint.loop.want_read(self.fd, True)
        self._parse()  # a pipelined request may be waiting in h11 already

    def close(self) -> None:
        self.timer.cancel()
        self.close_socket()
        self.machine.remove_model(self)
        self.endpoint.scrapers.pop(self.fd, None)
