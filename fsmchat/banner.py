"""The line that tells a person where to connect, said on stderr once the server listens.

``server.started`` says the port for programs; a person starting ``fsmchat`` at a terminal (or
with ``--log-level warning``, which hides that event) needs it said plainly, with the command
that connects: ``nc HOST PORT`` for plain TCP, ``openssl s_client -connect HOST:PORT`` for TLS,
the URL of the metrics. Raw mode is anonymous and passes terminal escapes on: the line says so,
and points to ``--mode chat``.

Rules it keeps:
- Said through ``logstream.say``: one line, never blocking, a failing stderr ignored.
- Said only when someone may need it: stderr is a terminal, or the level hides
  ``server.started`` (else nothing tells the port). A pipeline or a service keeps its stderr
  for problems, one line each.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Sequence

from fsmchat.ops.logstream import LEVELS, say
from fsmchat.options import Options

_STARTED_LEVEL = "info"
"""The level of ``server.started`` (events.CATALOGUE)."""

_ANYWHERE = {"", "0.0.0.0", "::"}


def tell_where_to_connect(options: Options,
                          listeners: Sequence[tuple[socket.socket, ssl.SSLContext | None]],
                          metrics: socket.socket | None,
                          web: tuple[socket.socket, ssl.SSLContext | None] | None = None) -> None:
    """Say the line, if someone may need it (see the module's rules)."""
    if os.isatty(2) or LEVELS.index(options.log_level) > LEVELS.index(_STARTED_LEVEL):
        say(where_to_connect(options, [(sock.getsockname()[1], tls is not None)
                                       for sock, tls in listeners],
                             None if metrics is None else metrics.getsockname()[1],
                             None if web is None else web[0].getsockname()[1]))


def where_to_connect(options: Options, ports: Sequence[tuple[int, bool]],
                     metrics_port: int | None, web_port: int | None = None) -> str:
    """The line: ``ports`` are the bound listeners, (port, speaks TLS), plain first."""
    host = _host(options.host)
    listening = ", ".join(f"TLS on port {port}" if tls else f"port {port}"
                          for port, tls in ports)
    commands = " or ".join(_command(host, port, tls, options) for port, tls in ports)
    line = f"listening on {listening} ({options.mode} mode): connect with {commands}"
    if web_port is not None:
        scheme = "https" if options.tls_cert else "http"
        web_host = _host(options.web_host or options.host)
        line += f", or open {scheme}://{_bracketed(web_host)}:{web_port}/ in a browser"
    if metrics_port is not None:
        metrics_host = _host(options.metrics_host or options.host)
        line += f"; metrics at http://{_bracketed(metrics_host)}:{metrics_port}/metrics"
    if options.mode == "raw":
        line += ("; raw mode is anonymous and passes terminal escapes on to everyone: try "
                 "--mode chat for names and clean lines")
    return line


def _command(host: str, port: int, tls: bool, options: Options) -> str:
    if not tls:
        return f"nc {host} {port}"
    command = f"openssl s_client -connect {_bracketed(host)}:{port}"
    if options.tls_client_ca:
        command += " -cert YOUR_CERT -key YOUR_KEY"
    return command


def _host(host: str | None) -> str:
    """The host to connect to: the one listened on, or this machine for every interface."""
    return "localhost" if host is None or host in _ANYWHERE else host


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
