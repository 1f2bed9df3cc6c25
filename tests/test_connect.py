"""``fsmchat connect``: the terminal client, in a pseudo-terminal, against a real server.

pexpect runs the client in a pseudo-terminal and pyte renders what it prints as a terminal
would, so the checks are on the screen a person sees (rows, and where the cursor is), not on
the escape sequences that drew it. The pyte screen answers the client's cursor position
requests, as a real terminal does. The other users are plain sockets (nc-like clients) of the
conftest harness; every wait polls the screen until a condition holds, with a deadline.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pyte
import pytest
import trustme
from chat_harness import Chatter, join
from conftest import (
    HOST,
    WAIT,
    ServerProcess,
    StartServer,
    free_port,
    recv_exactly,
    run_cli,
    server_command,
    server_env,
    usage_error,
    wait_event_count,
)
from tls_certs import TlsFiles, make_tls_files, tls_args, tls_port_of

ROOT = Path(__file__).resolve().parent.parent
ROWS, COLS = 24, 80
PROMPT = "> "
WELCOME = re.compile(r"\*\*\* welcome, you are (\S+) \(")
CLOSED = "the server closed the connection"
UP = "\x1b[A"


class _Screen(pyte.Screen):
    """A pyte screen that answers what the program asks of its terminal (cursor position)."""

    def __init__(self, columns: int, lines: int, reply: Callable[[str], object]) -> None:
        super().__init__(columns, lines)
        self._reply = reply

    def write_process_input(self, data: str) -> None:
        self._reply(data)


class Terminal:
    """``fsmchat connect ARGS`` in a pseudo-terminal, and the screen it draws."""

    def __init__(self, *args: str) -> None:
        env = {**server_env(), "TERM": "xterm", "LANG": "C.UTF-8"}
        command = server_command("connect", *args)
        self.child: pexpect.spawn[bytes] = pexpect.spawn(
            command[0], command[1:], env=env, dimensions=(ROWS, COLS))
        self.screen = _Screen(COLS, ROWS, self.child.send)
        self._stream = pyte.ByteStream(self.screen)
        #: Every byte the client wrote to the terminal.
        self.output = bytearray()
        self.ended = False

    def type(self, keys: str) -> None:
        self.child.send(keys)

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    def prompt_row(self) -> str:
        """The row the cursor is on: the line being typed."""
        return self.rows()[self.screen.cursor.y]

    def describe(self) -> str:
        return "\n".join(f"{i:2} |{row}" for i, row in enumerate(self.rows()))

    def _pump(self, timeout: float) -> None:
        try:
            data = self.child.read_nonblocking(65536, timeout)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            self.ended = True
            return
        self.output += data
        self._stream.feed(data)

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Read and render the client's output until ``condition()`` holds, or fail."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if self.ended or remaining <= 0:
                why = "the client exited" if self.ended else f"timed out after {timeout}s"
                raise AssertionError(f"{why} waiting for {what}; the screen:\n{self.describe()}")
            self._pump(min(remaining, 0.2))

    def wait_row(self, text: str) -> int:
        """The index of the first row that shows exactly ``text``, once there is one."""
        self.wait(lambda: text in self.rows(), f"a row {text!r}")
        return self.rows().index(text)

    def wait_prompt(self, typed: str = "") -> int:
        """Wait until the prompt shows ``typed`` with the cursor after it; its row index."""
        want = (PROMPT + typed).rstrip()
        self.wait(lambda: self.prompt_row() == want
                  and self.screen.cursor.x == len(PROMPT + typed),
                  f"the prompt {want!r} with the cursor at its end")
        return self.screen.cursor.y

    def welcome(self) -> str:
        """The name the server's welcome gave this client."""
        self.wait(lambda: any(WELCOME.match(row) for row in self.rows()), "the welcome")
        match = next(m for row in self.rows() if (m := WELCOME.match(row)))
        return match.group(1)

    def wait_exit(self) -> int:
        """The exit status, once the client exited (what it printed is rendered)."""
        self.wait(lambda: self.ended, "the client to exit")
        self.child.wait()
        assert self.child.exitstatus is not None, f"killed by signal {self.child.signalstatus}"
        status: int = self.child.exitstatus
        return status

    def close(self) -> None:
        self.child.close(force=True)


@pytest.fixture
def terminals() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        terminal = Terminal(*args)
        opened.append(terminal)
        return terminal

    yield start
    for terminal in opened:
        terminal.close()


@pytest.fixture
def chat(start_server: StartServer) -> ServerProcess:
    return start_server("--mode", "chat")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def joined(server: ServerProcess, terminal: Terminal, *present: Chatter) -> str:
    """The terminal's name, once the server welcomed it and ``present`` were told."""
    name = terminal.welcome()
    for other in present:
        other.expect(f"*** {name} joined lobby\n")
    terminal.wait_prompt()
    return name


# --- what a person sees ----------------------------------------------------------------------

def test_a_line_arriving_while_typing_goes_above_and_the_typed_line_stays_intact(
    chat: ServerProcess, terminals: Callable[..., Terminal]
) -> None:
    nc = join(chat)
    term = terminals(HOST, str(chat.port))
    name = joined(chat, term, nc)
    term.type("half typed")
    term.wait_prompt("half typed")

    nc.say("hello from nc")
    incoming = f"<{nc.name}> hello from nc"
    term.wait(lambda: incoming in term.rows() and term.prompt_row() == "> half typed"
              and term.screen.cursor.x == len("> half typed"),
              "the line above an intact prompt")
    rows = term.rows()
    welcome_row = next(i for i, row in enumerate(rows) if WELCOME.match(row))
    assert welcome_row < rows.index(incoming) < term.screen.cursor.y, term.describe()
    assert [row for row in rows if "half typed" in row] == ["> half typed"], term.describe()

    term.type(" and done\r")
    nc.expect(f"<{name}> half typed and done\n")
    done_row = term.wait_row("> half typed and done")
    assert term.wait_prompt() == done_row + 1

    # A burst that scrolls the screen: the typed text stays whole on the bottom row.
    term.type("second half")
    term.wait_prompt("second half")
    burst = [f"line {i} of the burst" for i in range(2 * ROWS)]
    nc.send("".join(line + "\n" for line in burst))
    last = f"<{nc.name}> {burst[-1]}"
    term.wait(lambda: term.rows()[ROWS - 2] == last, "the burst's last line above the prompt")
    term.wait_prompt("second half")
    assert term.screen.cursor.y == ROWS - 1
    shown = term.rows()[: ROWS - 1]
    assert shown == [f"<{nc.name}> {line}" for line in burst[-(ROWS - 1):]], term.describe()
    term.type("\r")
    nc.expect(f"<{name}> second half\n")
    nc.quiet()


def test_the_up_arrow_recalls_a_line_typed_before(
    chat: ServerProcess, terminals: Callable[..., Terminal]
) -> None:
    nc = join(chat)
    term = terminals(HOST, str(chat.port))
    name = joined(chat, term, nc)
    for line in ("the first line", "the second line"):
        term.type(line + "\r")
        nc.expect(f"<{name}> {line}\n")
    term.wait_prompt()
    term.type(UP + UP)
    term.wait_prompt("the first line")
    term.type("\r")
    nc.expect(f"<{name}> the first line\n")
    nc.quiet()


def test_raw_mode_bytes_reach_the_screen_harmless(
    start_server: StartServer, terminals: Callable[..., Terminal]
) -> None:
    server = start_server()
    other = server.connect()
    term = terminals(HOST, str(server.port))
    connected = term.wait_row(
        f"fsmchat: connected to {HOST}:{server.port} (Ctrl-D or Ctrl-C to leave)")
    term.wait_prompt()
    wait_event_count(server, "connection.accepted", 2)  # the terminal's: it gets what follows

    other.sock.sendall(b"\x1b[2J\x1b[31mred\x07 \xff\xfe bytes\r\n\x1b]0;title\x07crlf\r\n")
    term.wait_row("^[[2J^[[31mred^G \ufffd\ufffd bytes")
    term.wait_row("^[]0;title^Gcrlf")
    assert term.rows()[connected].startswith("fsmchat: connected"), term.describe()
    colours = {char.fg for row in term.screen.buffer.values() for char in row.values()}
    assert colours == {"default"}, term.describe()

    other.sock.sendall(b"no newline")
    term.wait_row("no newline")
    term.wait_prompt()

    term.type("from the terminal\r")
    assert recv_exactly(other.sock, 18) == b"from the terminal\n"


def test_it_chats_over_tls(
    start_server: StartServer, terminals: Callable[..., Terminal], files: TlsFiles
) -> None:
    server = start_server("--mode", "chat", *tls_args(files))
    nc = join(server)
    port = tls_port_of(server)
    term = terminals(HOST, str(port), "--tls", "--ca", str(files.ca_pem))
    term.wait(lambda: any(row.startswith(f"fsmchat: connected to {HOST}:{port} over TLS")
                          for row in term.rows()), "the connected line")
    name = joined(server, term, nc)
    nc.say("to the tls user")
    term.wait_row(f"<{nc.name}> to the tls user")
    term.type("to the plain user\r")
    nc.expect(f"<{name}> to the plain user\n")
    assert len(server.events("connection.secured")) == 1


# --- the ends of a session -------------------------------------------------------------------

def test_the_server_closing_is_reported_and_the_client_exits_0(
    chat: ServerProcess, terminals: Callable[..., Terminal]
) -> None:
    term = terminals(HOST, str(chat.port))
    joined(chat, term)
    term.type("never sent")
    term.wait_prompt("never sent")
    assert chat.stop() == 0
    assert term.wait_exit() == 0
    rows = term.rows()
    assert "*** the server is shutting down" in rows, term.describe()
    assert f"fsmchat: {CLOSED}" in rows, term.describe()
    assert b"Traceback" not in term.output


@pytest.mark.parametrize(("key", "status"), [("\x04", 0), ("\x03", 130)],
                         ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_leave_cleanly(
    chat: ServerProcess, terminals: Callable[..., Terminal], key: str, status: int
) -> None:
    nc = join(chat)
    term = terminals(HOST, str(chat.port))
    name = joined(chat, term, nc)
    if key == "\x03":
        term.type("half a line")  # Ctrl-C leaves whatever is typed
        term.wait_prompt("half a line")
    term.type(key)
    assert term.wait_exit() == status
    assert b"Traceback" not in term.output
    assert CLOSED.encode() not in term.output
    nc.expect(f"*** {name} left lobby\n")
    nc.quiet()


def run_piped(*args: str, given: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(server_command("connect", *args), input=given, capture_output=True,
                          timeout=WAIT + 5, env=server_env(), check=False)


def test_piped_it_sends_the_lines_read_and_prints_what_arrives(chat: ServerProcess) -> None:
    nc = join(chat)
    result = run_piped(HOST, str(chat.port), given=b"/nick piper\r\nhello\nno newline")
    assert result.returncode == 0, result
    lines = result.stdout.decode().splitlines()
    assert WELCOME.match(lines[0]) and lines[1:] == ["*** you are now piper"], lines
    assert result.stderr.decode().splitlines() == [
        f"fsmchat: connected to {HOST}:{chat.port}", f"fsmchat: {CLOSED}"]
    welcome = WELCOME.match(lines[0])
    assert welcome is not None
    name = welcome.group(1)
    nc.expect(f"*** {name} joined lobby\n", f"*** {name} is now piper\n", "<piper> hello\n",
              "<piper> no newline\n", "*** piper left lobby\n")


def test_piped_over_tls_it_leaves_once_the_server_is_quiet(
    start_server: StartServer, files: TlsFiles
) -> None:
    server = start_server(*tls_args(files))
    other = server.connect()
    result = run_piped(HOST, str(tls_port_of(server)), "--ca", str(files.ca_pem),
                       given=b"over tls\n")
    assert result.returncode == 0, result
    assert recv_exactly(other.sock, 9) == b"over tls\n"
    assert "Traceback" not in result.stderr.decode()
    assert "left" in result.stderr.decode().splitlines()[-1], result.stderr


# --- refusals: one line, no traceback ---------------------------------------------------------

def one_line(result: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    assert result.returncode == status, result
    assert result.stdout == "", result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("trust", ["other-ca", "system"])
def test_a_server_certificate_that_does_not_verify_is_refused_with_one_line(
    start_server: StartServer, files: TlsFiles, tmp_path: Path, trust: str
) -> None:
    server = start_server(*tls_args(files))
    port = tls_port_of(server)
    if trust == "other-ca":
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        result = run_cli("connect", HOST, str(port), "--ca", str(other))
    else:
        result = run_cli("connect", HOST, str(port), "--tls")
    one_line(result, 1, f"{HOST}:{port}", "certificate")
    server.wait_event("connection.tls_error")


def test_a_server_that_is_not_there_is_one_line_and_status_1() -> None:
    port = free_port()
    one_line(run_cli("connect", HOST, str(port)), 1, f"{HOST}:{port}", "refused")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        ([HOST, "abc"], "PORT"),
        ([HOST, "0"], "PORT"),
        ([HOST, "65536"], "PORT"),
        ([HOST], "PORT"),
        ([HOST, "8080", "--ca", "missing.pem"], "--ca"),
        ([HOST, "8080", "--ca", "README.md"], "--ca"),
        ([HOST, "8080", "--colour"], "--colour"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], option: str) -> None:
    args = [str(ROOT / arg) if arg.endswith((".md", ".pem")) else arg for arg in args]
    usage_error(run_cli("connect", *args), option)


def test_help_describes_the_client_and_the_server_help_names_it() -> None:
    result = run_cli("connect", "--help")
    assert result.returncode == 0, result
    for word in ("HOST", "PORT", "--tls", "--ca", "Ctrl-D", "Up"):
        assert word in result.stdout, word
    assert "fsmchat connect" in run_cli("--help").stdout

