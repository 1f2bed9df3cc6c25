"""``GET /metrics`` over HTTP/1.1, served by the same select loop as the chat (``net.http``).

Rules it keeps:
- ``GET``/``HEAD /metrics`` answer 200 with the exposition; another path 404; another method on
  it 405 (with ``Allow``). Nothing a scraper sends can reach the chat.
- At most ``MAX_SCRAPERS`` connections at once; the chat's ``--allow``/``--deny`` apply here too.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
from structlog.typing import FilteringBoundLogger

from fsmchat.net.http import Answer, HttpConnection, Site
from fsmchat.net.loop import EventLoop

PATH = b"/metrics"
MAX_SCRAPERS = 4
"""Metrics connections open at once; more are accepted and closed at once."""


class MetricsSite(Site):
    name = "metrics"

    def __init__(self, loop: EventLoop, log: FilteringBoundLogger,
                 render: Callable[[], bytes], content_type: str) -> None:
        super().__init__(loop, log, places=MAX_SCRAPERS)
        self.render = render
        self.content_type = content_type

    def answer(self, request: h11.Request, conn: HttpConnection) -> Answer:
        if request.target.split(b"?", 1)[0] != PATH:
            return Answer.plain(404)
        if request.method not in (b"GET", b"HEAD"):
            return Answer.plain(405, headers=[("Allow", "GET, HEAD")])
        return Answer(200, [("Content-Type", self.content_type)], self.render())
