"""Why a connection closed, was turned away, or why Redis messages were dropped: one catalogue.

The reasons are public: the ``reason`` field of ``connection.closed``, ``connection.rejected``,
``http.rejected``, ``server.forced`` and ``redis.dropped``, and the ``reason`` label of the
closed and rejected counters (``server.stats``, ``/metrics``). ``Reason`` is a ``StrEnum``, so a
member is its string in JSON and in labels; the code names members, never literals, and each
member says in ``doc`` what it means (the docs are generated from it).

One family is open-ended: a socket error closes (or turns away) a client with ``error_reason``,
which is ``reset``, ``broken_pipe`` or ``timeout`` for the common errors and the lower-case errno
name for any other (``econnaborted``, ...): see ``ERRNO_DOC``.
"""

from __future__ import annotations

import errno
from enum import StrEnum


class Reason(StrEnum):
    doc: str  # what the reason means, for people

    def __new__(cls, value: str, doc: str) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member

    # a client's connection closed (connection.closed)
    PEER_CLOSED = "peer_closed", "the client closed its side (EOF); what was queued was delivered"
    QUIT = "quit", "chat mode: the client typed /quit; what was queued was delivered"
    SERVER_SHUTDOWN = "server_shutdown", "the server stopped; what was queued was delivered"
    DRAIN_TIMEOUT = "drain_timeout", "the stop took longer than --drain-timeout: closed at once"
    SECOND_SIGNAL = "second_signal", "a second stop signal: closed at once"
    QUEUE_LIMIT = "queue_limit", "its queue would pass --max-queue-bytes: it reads too slowly"
    IDLE_TIMEOUT = "idle_timeout", "it sent nothing for --idle-timeout seconds"
    HANDSHAKE_TIMEOUT = "handshake_timeout", "its TLS handshake outlasted --handshake-timeout"
    HANDSHAKE_LIMIT = "handshake_limit", ("the oldest of too many unfinished TLS handshakes (a "
                                          "quarter of --max-clients), closed for a newcomer")
    TLS_ERROR = "tls_error", "a TLS protocol error (a failed handshake, a bad record)"
    MESSAGE_TOO_BIG = ("message_too_big", "WebSocket: it sent a message over the limit "
                       "(--max-line in chat mode, 64 KiB in raw mode): closed with 1009")
    WEBSOCKET_ERROR = ("websocket_error", "WebSocket: a malformed frame (1002), a text frame that "
                       "is not UTF-8 (1007) or, in chat mode, a binary frame (1003)")
    NO_PONG = "no_pong", "WebSocket: it did not answer the server's ping within 30 s"
    KICKED = "kicked", "chat mode: an operator typed /kick NAME; its last line says who"
    INTERNAL_ERROR = "internal_error", "a bug in the server (logged as lifecycle.bug) closed it"
    RESET = "reset", "the client reset the connection (ECONNRESET)"
    BROKEN_PIPE = "broken_pipe", "the client stopped receiving while the server sent (EPIPE)"
    TIMEOUT = "timeout", "the network gave up on the client (ETIMEDOUT: keepalive, retransmits)"
    # a newcomer turned away (connection.rejected, http.rejected)
    DENIED = "denied", "its address is not allowed (--allow, --deny)"
    FD_LIMIT = "fd_limit", "its descriptor is at or above FD_SETSIZE, which select cannot watch"
    PER_ADDR_LIMIT = "per_addr_limit", "its address has --max-clients-per-addr clients already"
    SERVER_FULL = "server_full", "the server has --max-clients clients already"
    BUSY = "busy", "metrics: every place is taken by a scraper being answered"
    # Redis messages dropped (redis.dropped)
    OUTBOX_FULL = "outbox_full", "Redis was away or slow and the outbox (--redis-outbox) was full"
    SHUTDOWN = "shutdown", "the server stopped before Redis took them"


ERRNO_DOC = "any other socket error: its errno name in lower case (econnaborted, ehostunreach, ...)"
"""What a reason outside the catalogue means: ``error_reason`` of a less common error."""

_ERRNO_REASONS = {errno.ECONNRESET: Reason.RESET, errno.EPIPE: Reason.BROKEN_PIPE,
                  errno.ETIMEDOUT: Reason.TIMEOUT}


def error_reason(exc: OSError) -> str:
    """The close reason a socket error gives: ``reset``, ``broken_pipe``, ``timeout`` or another
    lower-case errno name."""
    code = exc.errno or 0
    return _ERRNO_REASONS.get(code) or errno.errorcode.get(code, str(code)).lower()
