"""``fsmchat connect HOST PORT``: a terminal client that never garbles what you are typing.

A line that arrives while you type is printed above the line being edited, which is then drawn
again as it was; Up and Down recall the lines typed before. prompt_toolkit does the line editing
and the redrawing, and it runs on asyncio, so this module is the one place of the package that
uses asyncio: the server keeps its one ``select`` loop and never imports this module (the
structure tests check both; ``cli`` imports it only when ``connect`` is the command).

Rules it keeps:
- What the server sends never reaches the terminal raw: each line goes through chat mode's
  ``clean`` (control characters in caret notation, invalid UTF-8 as U+FFFD, invisible characters
  as ``<U+XXXX>``), so a raw-mode server, or anyone on it, cannot move the cursor, recolour the
  terminal or forge a line. An unfinished line is shown once nothing more came for ``HOLD``.
- Every line typed goes out with ``\\n``; a CR before ``\\n`` from the server ends the line too.
- Standard input or output not a terminal: no prompt_toolkit; the lines read from standard
  input are sent, the lines that arrive go to standard output, the client's own words to
  standard error. At the end of the input it half-closes (TLS, which asyncio cannot half-close:
  it leaves once the server has been quiet for ``QUIET``) and stays until the server closes.
- Whatever happens, one plain line and an exit status, never a traceback: 0 once connected
  (the server closed, or you left with Ctrl-D), 1 if it never connected, 130 for Ctrl-C,
  143 for SIGTERM or SIGHUP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal

from fsmchat.chat.text import clean

CONNECT_TIMEOUT = 15.0
"""Seconds for the TCP connection and the TLS handshake together."""
HOLD = 0.3
"""Seconds an unfinished line waits for its end before it is shown as it is."""
QUIET = 1.0
"""Seconds of silence after which a piped TLS session leaves (see the module's rules)."""
TAIL_MAX = 64 * 1024
"""An unfinished line this long is shown at once."""
READ_SIZE = 65536
PROMPT = "> "
#: Exit statuses besides 0 (connected, then the server closed or you left) and 1 (never connected).
INTERRUPTED = 130
TERMINATED = 143

Show = Callable[[str], Awaitable[None]]


class ConnectError(Exception):
    """The connection could not be made; the text is the one line to print."""


class CaError(Exception):
    """A --ca file that cannot be used; the text says why."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    #: The TLS context, or None for plain TCP.
    tls: ssl.SSLContext | None

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """A context that verifies the server's certificate and name: against the CAs in ``ca``,
    or the system's when ``ca`` is None."""
    try:
        return ssl.create_default_context(cafile=None if ca is None else str(ca))
    except OSError as exc:  # SSLError is an OSError: check it first
        if isinstance(exc, ssl.SSLError):
            raise CaError(f"not a PEM file of CA certificates ({exc.reason or exc})") from None
        raise CaError(f"cannot read it: {exc.strerror or exc}") from None


def run(target: Target) -> int:
    """Connect, chat until the server closes or the user leaves, and return the exit status."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        return asyncio.run(_main(target, interactive))
    except KeyboardInterrupt:
        return INTERRUPTED
    except ConnectError as exc:
        print(f"fsmchat connect: {exc}", file=sys.stderr)
        return 1


async def _main(target: Target, interactive: bool) -> int:
    task = asyncio.current_task()
    assert task is not None
    stopped: list[int] = []

    def stop(signum: int) -> None:
        stopped.append(signum)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(signum, stop, signum)
    try:
        reader, writer = await _dial(target)
        try:
            if interactive:
                return await _interactive(target, reader, writer)
            return await _piped(target, reader, writer)
        finally:
            await _close(writer)
    except asyncio.CancelledError:
        if not stopped:
            raise  # Ctrl-C as a signal: asyncio.run raises KeyboardInterrupt
        task.uncancel()
        return TERMINATED


async def _dial(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the first address of HOST that answers; every failure is a ConnectError."""
    where = target.where
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            infos = await asyncio.get_running_loop().getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM)
            first: OSError | None = None
            for _family, _type, _proto, _name, address in infos:
                try:
                    return await asyncio.open_connection(
                        str(address[0]), target.port, ssl=target.tls,
                        server_hostname=target.host if target.tls else None)
                except ssl.SSLError:
                    raise
                except OSError as exc:
                    first = first or exc
            raise first or OSError(f"no address for {target.host}")
    except TimeoutError:
        raise ConnectError(
            f"cannot connect to {where}: no answer within {CONNECT_TIMEOUT:.0f} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise ConnectError(f"{where}: the server's certificate is not trusted "
                           f"({exc.verify_message}); see --ca") from None
    except ssl.SSLError as exc:
        raise ConnectError(f"{where}: the TLS handshake failed ({exc.reason or exc}); "
                           "is it the server's TLS port?") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {where}: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    """An error in plain words: ``Connection refused``, not asyncio's ``Connect call failed``."""
    if isinstance(exc, socket.gaierror | ssl.SSLError) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        pass  # the connection is gone either way


def shown(line: bytes) -> str:
    """A line from the server as it may reach a terminal: CR before the end dropped, then
    cleaned as chat mode cleans text (caret notation, U+FFFD, ``<U+XXXX>``)."""
    return clean(line.removesuffix(b"\r")).decode("utf-8", "replace")


async def _receive(reader: asyncio.StreamReader, show: Show) -> str | None:
    """Show what arrives, line by line, until the server closes: None then, or what broke."""
    pending = b""
    while True:
        try:
            if pending:
                chunk = await asyncio.wait_for(reader.read(READ_SIZE), HOLD)
            else:
                chunk = await reader.read(READ_SIZE)
        except TimeoutError:
            await show(shown(pending) + "\n")
            pending = b""
            continue
        except OSError as exc:
            return _why(exc)
        if not chunk:
            if pending:
                await show(shown(pending) + "\n")
            return None
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) >= TAIL_MAX:
            lines.append(pending)
            pending = b""
        if lines:
            await show("".join(shown(line) + "\n" for line in lines))


def _wire(text: str) -> bytes:
    """A typed (or pasted) text as lines on the wire, each ending with ``\\n``."""
    return "".join(line + "\n" for line in text.splitlines() or [""]).encode()


def _write(text: str, stream: TextIO | None = None) -> None:
    out = sys.stdout if stream is None else stream
    out.write(text)
    out.flush()


def _closed_words(broken: str | None) -> str:
    if broken is None:
        return "fsmchat: the server closed the connection\n"
    return f"fsmchat: the connection to the server was lost ({broken})\n"


def _connected_words(target: Target, writer: asyncio.StreamWriter, keys: str) -> str:
    tls = writer.get_extra_info("ssl_object")
    over = f" over {tls.version()}" if isinstance(tls, ssl.SSLObject) else ""
    return f"fsmchat: connected to {target.where}{over}{keys}\n"


# --- at a terminal -------------------------------------------------------------------------

async def _interactive(
    target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> int:
    """The prompt and the receiver side by side, until one of them ends the session."""
    _write(_connected_words(target, writer, " (Ctrl-D or Ctrl-C to leave)"))
    session: PromptSession[str] = PromptSession(PROMPT)

    async def show(text: str) -> None:
        # Above the prompt while one is shown (erased, printed, redrawn), else straight out.
        await run_in_terminal(lambda: _write(text))

    receiving = asyncio.create_task(_receive(reader, show))
    typing = asyncio.create_task(_type(session, writer))
    try:
        done, _ = await asyncio.wait({receiving, typing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (typing, receiving):
            task.cancel()
        await asyncio.gather(typing, receiving, return_exceptions=True)
    left = typing.result() if typing in done else None
    if isinstance(left, int):
        return left
    _write(_closed_words(receiving.result() if receiving in done else left))
    return 0


async def _type(session: PromptSession[str], writer: asyncio.StreamWriter) -> int | str:
    """Send each line typed until you leave (the exit status: Ctrl-D 0, Ctrl-C 130) or the
    connection breaks (what broke)."""
    while True:
        try:
            text = await session.prompt_async()
        except EOFError:
            return 0
        except KeyboardInterrupt:  # prompt_toolkit's Ctrl-C key, not a signal: end here
            return INTERRUPTED
        writer.write(_wire(text))
        try:
            await writer.drain()
        except OSError as exc:
            return _why(exc)


# --- piped -----------------------------------------------------------------------------------

async def _piped(
    target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> int:
    """Lines from standard input out, lines from the server to standard output."""
    _write(_connected_words(target, writer, ""), sys.stderr)
    loop = asyncio.get_running_loop()
    last_heard = [loop.time()]

    async def show(text: str) -> None:
        last_heard[0] = loop.time()
        _write(text)

    receiving = asyncio.create_task(_receive(reader, show))
    sending = asyncio.create_task(_send_input(writer, last_heard))
    try:
        await asyncio.wait({receiving, sending}, return_when=asyncio.FIRST_COMPLETED)
        if sending.done() and not sending.result():
            await receiving  # half-closed: what the server still says, until it closes
    finally:
        for task in (sending, receiving):
            task.cancel()
        await asyncio.gather(sending, receiving, return_exceptions=True)
    if receiving.cancelled():
        _write("fsmchat: the input ended and the server was quiet: left\n", sys.stderr)
    else:
        _write(_closed_words(receiving.result()), sys.stderr)
    return 0


async def _send_input(writer: asyncio.StreamWriter, last_heard: list[float]) -> bool:
    """Standard input's lines to the server. At its end, half-close (False); over TLS, which
    cannot, wait until the server has been quiet for ``QUIET`` and leave (True). A broken
    connection ends it early, with False: the receiver says what happened."""
    try:
        await _copy_lines(writer)
    except OSError:
        return False
    if writer.can_write_eof():
        writer.write_eof()
        return False
    loop = asyncio.get_running_loop()
    while (wait := last_heard[0] + QUIET - loop.time()) > 0:
        await asyncio.sleep(wait)
    return True


async def _copy_lines(writer: asyncio.StreamWriter) -> None:
    """Standard input's lines to the server, each ending with ``\\n`` (the last one too)."""
    pending = b""
    async for chunk in _input():
        *lines, pending = (pending + chunk).split(b"\n")
        if lines:
            writer.write(b"".join(line.removesuffix(b"\r") + b"\n" for line in lines))
            await writer.drain()
    if pending:
        writer.write(pending.removesuffix(b"\r") + b"\n")
        await writer.drain()


async def _input() -> AsyncIterator[bytes]:
    """Standard input, chunk by chunk: through the event loop when it is a pipe, a socket or a
    terminal; read straight when it is a regular file or /dev/null (which epoll refuses, and
    whose reads never block)."""
    fd = sys.stdin.fileno()
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        while chunk := os.read(fd, READ_SIZE):
            yield chunk
        return
    stdin = asyncio.StreamReader()
    blocking = os.get_blocking(fd)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), os.fdopen(os.dup(fd), "rb"))
    try:
        while chunk := await stdin.read(READ_SIZE):
            yield chunk
    finally:
        transport.close()
        os.set_blocking(fd, blocking)  # the descriptor is shared with whoever started us
