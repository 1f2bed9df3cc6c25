"""The web port: the chat's page, its two files, and the WebSocket that lets a browser in.

Served over ``net.http`` from the one loop. ``GET /`` is the page, ``/app.js`` and
``/style.css`` its script and style (package data, read once at start), ``/ws`` the WebSocket:
a valid handshake leaves HTTP for the connection table (``WebConnection``), where the
acceptor seats it like any newcomer.

Rules it keeps:
- A cross-site page may not open the WebSocket (cross-site WebSocket hijacking): a handshake
  whose ``Origin`` is not this site's own (``Host``, with this port's scheme) nor one of
  ``--web-origin`` is answered 403. One without ``Origin`` comes from no browser page: allowed.
- A handshake is an HTTP/1.1 GET without a body; anything else asking to upgrade is 400.
- A handshake the chat has no room for (``--max-clients``, ``--max-clients-per-addr``, or
  a descriptor select cannot watch) is refused in words a page's script can read (an HTTP 503
  it cannot): the WebSocket is accepted, then the refusal goes out at once, in one
  non-blocking send as the acceptor's to nc users, and the socket closes without taking a
  seat: in chat mode the ``*** `` line an nc user reads, as a text frame, then a close frame
  with 1013 (try again later; 1008 for an address not allowed) and the same words as its
  reason; in raw mode, whose frames are the relay's bytes, the close frame alone. ``/ws``
  without an upgrade is 426. An address ``--allow``/``--deny`` keep out is closed as it is
  accepted, as on every port (``http.rejected``): it gets no answer at all.
- Chat mode: a handshake that offers the subprotocol ``fsmchat.ids`` is accepted with it (its
  frames carry ids), and one whose query has ``room`` or ``after`` comes back
  (``chat/resume.py``). The query is checked as a whole before anything is accepted: a value
  given twice, a bad room name, an id not of ``Hub.msg_id``'s making or more than ``MAX_AFTER``
  of them is answered 400 with what is wrong (a page of this server never sends one; other
  parameters are ignored). A good id the history does not hold is no error: the page is told
  the gap is too old.
- Every answer carries a strict Content-Security-Policy (nothing but this site's own script,
  style and WebSocket; no inline script, no frames), ``nosniff`` and no referrer; no cookies.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from collections.abc import Sequence
from importlib import resources
from urllib.parse import unquote_to_bytes

import h11
from structlog.typing import FilteringBoundLogger
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import RemoteProtocolError

from fsmchat.acceptor import Acceptor
from fsmchat.chat.resume import Resume
from fsmchat.chat.text import room_problem
from fsmchat.lifecycle import Trigger
from fsmchat.net.http import Answer, Headers, HttpConnection, Site
from fsmchat.options import WEB_FDS
from fsmchat.reasons import Reason
from fsmchat.web.websocket import BINARY, TEXT, Frames, WebConnection, frame_header

WEB_PLACES = WEB_FDS
"""HTTP connections of the web port open at once (a browser opens up to six for one page); the
default --max-clients leaves their descriptors out."""

SECURITY: Headers = [
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; "
     "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
     "form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]

FILES = {b"/": ("index.html", "text/html; charset=utf-8"),
         b"/index.html": ("index.html", "text/html; charset=utf-8"),
         b"/app.js": ("app.js", "text/javascript; charset=utf-8"),
         b"/style.css": ("style.css", "text/css; charset=utf-8")}

WS_PATH = b"/ws"

SUBPROTOCOL = "fsmchat.ids"
"""The WebSocket subprotocol of a chat-mode client that reads the ids of room messages
(``chat/resume.py``). Raw mode accepts it too, for the same page, and it changes nothing there:
no ids, and the query is not read."""

MAX_AFTER = 32
"""Most ids a client coming back may name (``after``): the page sends its last 16."""

MESSAGE_ID = re.compile(rb"[0-9a-f]{16}-[1-9][0-9]{0,19}")
"""A message id as ``Hub.msg_id`` makes them: the origin's 16 hex digits, a dash, its number."""

REFUSAL_CODES: dict[str, int] = {Reason.DENIED: CloseReason.POLICY_VIOLATION}
"""The close code of a WebSocket the chat turns away: 1013 (try again later) but for these."""


def _static(name: str) -> bytes:
    return resources.files("fsmchat.web").joinpath("static", name).read_bytes()


class WebSite(Site):
    name = "web"

    def __init__(self, acceptor: Acceptor, log: FilteringBoundLogger, *, mode: str, limit: int,
                 origins: Sequence[str] = (), tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = 0.0) -> None:
        super().__init__(acceptor.loop, log, places=WEB_PLACES, tls=tls,
                         handshake_timeout=handshake_timeout)
        self.acceptor = acceptor
        self.scheme = "https" if tls is not None else "http"
        self.any_origin = "*" in origins
        self.origins = {origin.rstrip("/").lower() for origin in origins}
        self.chat = mode == "chat"
        self.frames = Frames(TEXT if self.chat else BINARY)
        self.limit = limit  # the longest message a browser may send
        self.files = {path: Answer(200, [("Content-Type", kind), *SECURITY], _static(name))
                      for path, (name, kind) in FILES.items()}
        self._pending: dict[int, tuple[WSConnection, bytes, str, Resume | None]] = {}  # fd ->
        # accepted handshake, why the chat turns it away ("" if it does not), what it asked

    # -- requests ----------------------------------------------------------------------------

    def answer(self, request: h11.Request, conn: HttpConnection) -> Answer:
        target = request.target.split(b"?", 1)[0]
        if target == WS_PATH:
            return self._refuse_upgrade(request, conn)
        found = self.files.get(target)
        if found is None:
            return Answer.plain(404, headers=SECURITY)
        if request.method not in (b"GET", b"HEAD"):
            return Answer.plain(405, headers=[("Allow", "GET, HEAD"), *SECURITY])
        return found

    def upgrade(self, request: h11.Request, conn: HttpConnection) -> bool:
        """A WebSocket handshake: wsproto accepts it here, the socket follows (into the chat,
        or told why the chat turns it away: ``take_over``)."""
        if request.target.split(b"?", 1)[0] != WS_PATH or not _upgrading(request):
            return False
        if not self._origin_ok(request):
            return False  # answered by _refuse_upgrade
        if request.http_version != b"1.1" or _has_body(request):
            return False  # not a handshake (RFC 6455 4.1): answered 400, however TCP cut it
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection([(key, value) for key, value in request.headers],
                                            request.target)
            asked = next((event for event in ws.events() if isinstance(event, Request)), None)
            if asked is None:
                return False
        except (RemoteProtocolError, h11.ProtocolError):  # (h11's: what wsproto builds from it)
            return False  # answered 400 by _refuse_upgrade
        ids = SUBPROTOCOL in asked.subprotocols  # (raw mode takes it too, and sends no ids:
        # browsers fail a handshake whose answer names none of the subprotocols offered)
        try:
            resume = resume_asked(request.target, ids) if self.chat else None
        except ValueError:
            return False  # answered 400, with what is wrong, by _refuse_upgrade
        accept = ws.send(AcceptConnection(subprotocol=SUBPROTOCOL if ids else None))
        self._pending[conn.fd] = ws, accept, self.acceptor.refusal(conn.host), resume
        return True

    def _refuse_upgrade(self, request: h11.Request, conn: HttpConnection) -> Answer:
        if not _upgrading(request):
            return Answer.plain(426, "this is the chat's WebSocket: open / instead",
                                [("Upgrade", "websocket"), *SECURITY], close=True)
        if not self._origin_ok(request):
            origin = _header(request, b"origin").decode("ascii", "replace")
            self.log.warning("http.bad_origin", site=self.name, peer=conn.peer, origin=origin)
            return Answer.plain(403, f"a page from {origin} may not join this chat "
                                "(see --web-origin)", SECURITY, close=True)
        if self.chat:
            try:
                resume_asked(request.target, False)
            except ValueError as exc:
                return Answer.plain(400, f"cannot come back so: {exc}", SECURITY, close=True)
        return Answer.plain(400, "not a valid WebSocket handshake", SECURITY, close=True)

    def _origin_ok(self, request: h11.Request) -> bool:
        origin = _header(request, b"origin").decode("ascii", "replace").rstrip("/").lower()
        if not origin or self.any_origin or origin in self.origins:
            return True
        host = _header(request, b"host").decode("ascii", "replace").lower()
        return origin == f"{self.scheme}://{host}"

    def take_over(self, conn: HttpConnection, trailing: bytes) -> None:
        ws, accept, refusal, resume = self._pending.pop(conn.fd)
        sock: socket.socket = conn.sock
        if refusal:
            self._turn_away(sock, conn, ws, accept, refusal)
            return
        web = WebConnection(sock, conn.peer, self.acceptor.hub, ws=ws, accept=accept,
                            trailing=trailing, frames=self.frames, limit=self.limit,
                            bytes_in=conn.bytes_in, resume=resume)
        self.acceptor.seat(web, conn.host, Trigger.UPGRADE)

    def _turn_away(self, sock: socket.socket, conn: HttpConnection, ws: WSConnection,
                   accept: bytes, reason: str) -> None:
        """Accepted, told why, closed: one non-blocking send (the socket's buffer is empty and
        this is some 200 bytes: it fits), never retried; never a seat."""
        acceptor = self.acceptor
        acceptor.refused(conn.peer, reason)
        line = acceptor.refusal_line(reason, conn.host)
        out = [accept]
        if self.frames.opcode == TEXT and line:
            out += [frame_header(TEXT, len(line)), line]
        words = line[4:].decode().strip() or str(reason)  # (without "*** ")
        code = REFUSAL_CODES.get(reason, CloseReason.TRY_AGAIN_LATER)
        out.append(ws.send(CloseConnection(code=code, reason=words)))
        with contextlib.suppress(OSError):  # full or gone: the close is the answer
            sock.send(b"".join(out))
        sock.close()


def resume_asked(target: bytes, ids: bool) -> Resume | None:
    """What a chat-mode handshake asks for: ids (the subprotocol), and in its query (``room``,
    ``after``: ids separated by commas, newest last) where it comes back and what it showed
    last; None for nothing. ValueError, saying what is wrong, for a query no page of this
    server sends (a value given twice, a bad room name, an id not made by ``Hub.msg_id``, more
    than ``MAX_AFTER`` of them); other parameters are ignored."""
    query = target.partition(b"?")[2]
    asked: dict[bytes, bytes] = {}
    for part in query.split(b"&") if query else ():
        key, _, value = part.partition(b"=")
        if key not in (b"room", b"after"):
            continue
        if key in asked:
            raise ValueError(f"{key.decode()} is given twice")
        asked[key] = unquote_to_bytes(value)
    room = asked.get(b"room", b"")
    if b"room" in asked:
        problem = room_problem(room)
        if problem is not None:
            raise ValueError(f"room: {problem.decode(errors='replace')}")
    after: tuple[bytes, ...] = ()
    if b"after" in asked:
        after = tuple(asked[b"after"].split(b","))
        if len(after) > MAX_AFTER:
            raise ValueError(f"after: at most {MAX_AFTER} ids, not {len(after)}")
        bad = next((msg_id for msg_id in after if not MESSAGE_ID.fullmatch(msg_id)), None)
        if bad is not None:
            raise ValueError(f"after: {bad.decode(errors='replace')!r} is not a message id")
    if not (ids or room or after):
        return None
    return Resume(ids, room, after)


def _header(request: h11.Request, name: bytes) -> bytes:
    for key, value in request.headers:
        if key == name:  # (h11 gives names in lower case)
            return bytes(value)
    return b""


def _has_body(request: h11.Request) -> bool:
    return (_header(request, b"content-length") not in (b"", b"0")
            or bool(_header(request, b"transfer-encoding")))


def _upgrading(request: h11.Request) -> bool:
    return request.method == b"GET" and b"websocket" in _header(request, b"upgrade").lower()
