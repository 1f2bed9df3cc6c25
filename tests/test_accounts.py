"""Accounts, the join password and moderators, as people see them: real servers, real sockets.

``--accounts FILE`` reserves names for those who give the password; wrong passwords make the
next try wait (the first wait is a second: a test that needs it over waits for it, polling);
``fsmchat passwd`` writes the file; operators kick, mute and set the topic; ``--password``
holds newcomers until they give the join password. Every answer is checked as the line a
person reads.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from chat_harness import WELCOME, Chatter, Lines, join, welcome
from conftest import (
    HOST,
    WAIT,
    Client,
    Event,
    ServerProcess,
    StartServer,
    peer_of,
    run_cli,
    server_command,
    server_env,
    usage_error,
)
from websockets.exceptions import ConnectionClosed
from ws_harness import WsLines, web_port, ws_connect

from fsmchat.chat.accounts import make_hash

PASSWORDS = {"alice": "wonder land", "bob": "builder", "olga": "op-secret"}
OPERATORS = {"olga"}
WAIT_LINE = re.compile(rb"\*\*\* too many tries for (\w+); wait (\d+) s\n")
WRONG_LINE = re.compile(rb"\*\*\* wrong password for (\w+) \(next try in (\d+) s\)\n")


@pytest.fixture(scope="module")
def accounts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accounts") / "accounts"
    path.write_text("# made by the test\n" + "".join(
        f"{name}:{make_hash(password)}{':op' if name in OPERATORS else ''}\n"
        for name, password in PASSWORDS.items()))
    return path


@pytest.fixture
def chat(start_server: StartServer, accounts_file: Path) -> ServerProcess:
    return start_server("--mode", "chat", "--accounts", str(accounts_file))


def connect_from(server: ServerProcess, source: str) -> Client:
    """A client whose address is ``source`` (another 127.x address: another address to the
    throttle)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect((HOST, server.port))
    peer = peer_of(sock)
    event = server.wait_for(lambda e: e.get("event") == "connection.accepted"
                            and e.get("peer") == peer)
    index = server.events().index(event)
    return Client(sock=sock, fd=int(event["fd"]), peer=peer, accepted_index=index)


def join_from(server: ServerProcess, source: str, *present: Chatter) -> Chatter:
    client = connect_from(server, source)
    lines = Lines(client.sock)
    match = WELCOME.fullmatch(lines.line())
    assert match is not None
    name = match.group(1).decode()
    for other in present:
        other.expect(f"*** {name} joined lobby\n")
    return Chatter(client, name, lines)


def login(chatter: Chatter, name: str, *present: Chatter, command: str = "/login") -> None:
    """Log ``chatter`` in as ``name`` (with the right password) and see it renamed."""
    op = ", an operator" if name in OPERATORS else ""
    chatter.say(f"{command} {name} {PASSWORDS[name]}")
    chatter.expect(f"*** logged in as {name}{op}\n", f"*** you are now {name}\n")
    for other in present:
        other.expect(f"*** {chatter.name} is now {name}\n")
    chatter.name = name


def wait_out(chatter: Chatter, line: str) -> bytes:
    """Send ``line`` until it is no longer answered with a wait (the wait is a second or two),
    and return the answer that came instead."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        chatter.say(line)
        answer = chatter.line()
        match = WAIT_LINE.fullmatch(answer)
        if match is None:
            return answer
        time.sleep(min(0.2, int(match.group(2))))
    raise AssertionError(f"still waiting after {WAIT}s")


def event_of(server: ServerProcess, kind: str, **fields: object) -> Event:
    """The first ``kind`` event with these fields (``name`` among them, which
    ``wait_event`` takes for the event's)."""
    return server.wait_for(
        lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in fields.items()),
        what=f"{kind} {fields}")


def help_lines(chatter: Chatter) -> bytes:
    """What ``/help`` lists (up to the answer of a ``/who`` sent after it)."""
    chatter.say("/help")
    chatter.say("/who")
    shown = b""
    while not re.fullmatch(rb"\*\*\* \d+ in lobby: .*\n", line := chatter.line()):
        shown += line
    return shown


# --- reserved names -------------------------------------------------------------------------


def test_a_reserved_name_is_refused_without_its_password_and_taken_with_it(
    chat: ServerProcess,
) -> None:
    a = join(chat)
    b = join(chat, a)
    b.say("/nick alice")
    b.expect("*** nick: alice is reserved; /nick alice PASSWORD if it is yours\n")
    b.say("/nick ALICE")
    b.expect("*** nick: alice is reserved; /nick alice PASSWORD if it is yours\n")
    b.say("/nick aIice")
    b.expect("*** nick: aIice looks too much like alice, a reserved name\n")
    b.say("/who")
    b.expect(f"*** 2 in lobby: {a.name}, {b.name}\n")
    a.quiet()
    old = b.name
    login(b, "alice", a, command="/nick")
    b.say("/nick wanderer")
    b.expect("*** you are now wanderer\n")
    a.expect("*** alice is now wanderer\n")
    b.say("/nick alice")  # one's own account's name, no password needed once logged in
    b.expect("*** you are now alice\n")
    a.expect("*** wanderer is now alice\n")
    a.say("/nick Alice")
    a.expect("*** nick: alice is reserved; /nick alice PASSWORD if it is yours\n")
    event = event_of(chat, "chat.login", name="alice")
    assert event["op"] is False and event["peer"] == b.client.peer
    assert old != "alice"


def test_login_takes_the_name_and_an_operators_commands(chat: ServerProcess) -> None:
    a = join(chat)
    b = join(chat, a)
    b.say("/kick " + a.name)
    b.expect("*** /kick is for operators only\n")
    shown = help_lines(b)
    assert b"/login NAME PASSWORD" in shown and b"/kick" not in shown
    login(b, "olga", a)
    shown = help_lines(b)
    assert b"/kick NAME [REASON]" in shown and b"/mute NAME [MINUTES]" in shown
    b.say("/login nobody secret")
    b.expect("*** login: nobody has no account\n")
    b.say("/login olga")
    b.expect("*** usage: /login NAME PASSWORD\n")
    a.quiet()


def test_no_newcomer_is_given_an_accounts_name(start_server: StartServer,
                                               tmp_path: Path) -> None:
    path = tmp_path / "accounts"
    path.write_text(f"user1:{make_hash('pw')}\nUSER3:{make_hash('pw')}\n")
    chat = start_server("--mode", "chat", "--accounts", str(path))
    first = join(chat)
    second = join(chat, first)
    assert (first.name, second.name) == ("user2", "user4")


def test_the_last_login_takes_the_name_from_an_older_connection(chat: ServerProcess) -> None:
    a = join(chat)
    login(a, "bob")
    b = join(chat, a)
    b.say(f"/login bob {PASSWORDS['bob']}")
    b.expect("*** logged in as bob\n")
    a.expect("*** bob logged in from another connection\n")
    fresh = a.line()
    match = re.fullmatch(rb"\*\*\* you are now (user\d+)\n", fresh)
    assert match is not None, fresh
    b.expect(f"*** bob is now {match.group(1).decode()}\n", "*** you are now bob\n")
    a.expect(f"*** {b.name} is now bob\n")


# --- wrong passwords --------------------------------------------------------------------------


def test_a_wrong_password_changes_nothing_and_makes_the_next_try_wait(
    chat: ServerProcess,
) -> None:
    a = join(chat)
    b = join(chat, a)
    b.say("/login alice not her password")
    wrong = WRONG_LINE.fullmatch(b.line())
    assert wrong is not None and wrong.group(1) == b"alice" and int(wrong.group(2)) >= 1
    b.say(f"/login alice {PASSWORDS['alice']}")  # the right one, at once: not even checked
    waiting = WAIT_LINE.fullmatch(b.line())
    assert waiting is not None and waiting.group(1) == b"alice"
    b.say("/who")
    b.expect(f"*** 2 in lobby: {a.name}, {b.name}\n")  # still not alice
    b.say("/kick " + a.name)
    b.expect("*** /kick is for operators only\n")
    failed = event_of(chat, "chat.login_failed", name="alice")
    assert failed["peer"] == b.client.peer and failed["wait"] >= 1
    answer = wait_out(b, f"/login alice {PASSWORDS['alice']}")  # once the wait is over
    assert answer == b"*** logged in as alice\n"
    b.expect("*** you are now alice\n")
    a.expect(f"*** {b.name} is now alice\n")
    for line in chat.lines() + chat.stderr().splitlines():
        assert "not her password" not in line and PASSWORDS["alice"] not in line


def test_wrong_passwords_are_slowed_per_name_and_per_address(chat: ServerProcess) -> None:
    guesser = join_from(chat, "127.0.0.2")
    guesser.say("/login alice guess")
    assert WRONG_LINE.fullmatch(guesser.line()) is not None
    # the same name from elsewhere waits too, even with the right password
    owner = join_from(chat, "127.0.0.3", guesser)
    owner.say(f"/nick alice {PASSWORDS['alice']}")
    assert WAIT_LINE.fullmatch(owner.line()) is not None
    # another name from the guessing address waits too
    guesser.say(f"/login bob {PASSWORDS['bob']}")
    match = WAIT_LINE.fullmatch(guesser.line())
    assert match is not None and match.group(1) == b"bob"
    # but another name from another address does not
    login(owner, "bob", guesser)
    # and the second wrong try makes a longer wait
    assert WRONG_LINE.fullmatch(wait_out(guesser, "/login alice guess again")) is not None
    second = chat.wait_for(lambda e: e.get("event") == "chat.login_failed"
                           and e["wait"] > 1.5, what="a second, longer wait")
    assert second["wait"] == 2.0


def test_a_read_full_of_logins_checks_one_password(chat: ServerProcess) -> None:
    """Each check is some milliseconds of the loop: one connection gets one a second."""
    a = join(chat)
    a.send(f"/login bob {PASSWORDS['bob']}\n".encode() * 200)
    a.expect("*** logged in as bob\n", "*** you are now bob\n")
    for _ in range(199):
        assert WAIT_LINE.fullmatch(a.line()) is not None
    a.say("/who")
    a.expect("*** 1 in lobby: bob\n")
    a.sock.close()
    chat.wait_closed(a.client)  # logged after any login the reads could have made
    assert len(chat.events("chat.login")) == 1


# --- fsmchat passwd ---------------------------------------------------------------------------


def passwd(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(server_command("passwd", *args), input=stdin, capture_output=True,
                          text=True, timeout=30, env=server_env(), check=False)


def test_passwd_adds_and_changes_accounts_the_server_takes(
    start_server: StartServer, tmp_path: Path,
) -> None:
    path = tmp_path / "accounts"
    result = passwd("carol", "--accounts", str(path), "--op", stdin="first one\n")
    assert result.returncode == 0, result
    assert result.stdout == "" and result.stderr == f"fsmchat passwd: added carol in {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = passwd("dave", "--accounts", str(path), stdin="daves\n")
    assert result.returncode == 0, result
    os.chmod(path, 0o640)
    result = passwd("carol", "--accounts", str(path), stdin="second one")  # no newline: fine
    assert result.returncode == 0 and "changed carol" in result.stderr, result
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an old file keeps its mode
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [line.split(":")[0] for line in lines] == ["carol", "dave"]
    assert lines[0].endswith(":op") and not lines[1].endswith(":op")  # carol is still an op
    assert "second one" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["accounts"]  # no temporary file left

    chat = start_server("--mode", "chat", "--accounts", str(path))
    a = join(chat)
    a.say("/login carol first one")
    assert WRONG_LINE.fullmatch(a.line()) is not None
    b = join_from(chat, "127.0.0.2", a)
    b.say("/login carol second one")
    assert WAIT_LINE.fullmatch(b.line()) is not None  # (the name waits a second)
    assert wait_out(b, "/login carol second one") == b"*** logged in as carol, an operator\n"


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (("al ice",), "pw\n", "'al ice' is not a name"),
    (("aIice",), "pw\n", "aIice looks too much like alice, who has an account (line 2)"),
    (("alice",), "\n", "the password is empty"),
    (("alice",), " padded\n", "starts or ends with a space"),
    (("alice",), "", "no password given; nothing changed"),
])
def test_passwd_errors_are_one_line_and_change_nothing(
    tmp_path: Path, args: tuple[str, ...], stdin: str, message: str,
) -> None:
    path = tmp_path / "accounts"
    path.write_text(f"# accounts\nalice:{make_hash('old')}\n")
    before = path.read_text()
    result = passwd(*args, "--accounts", str(path), stdin=stdin)
    assert result.returncode == 1, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("fsmchat passwd: ") and message in line, line
    assert path.read_text() == before


def test_passwd_refuses_a_bad_file_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "accounts"
    path.write_text("# ok\nbroken line\n")
    result = passwd("alice", "--accounts", str(path), stdin="pw\n")
    assert result.returncode == 1
    assert result.stderr == (f"fsmchat passwd: {path}: line 2: expected NAME:HASH or "
                             "NAME:HASH:op\n")


# --- the server's options ---------------------------------------------------------------------


def test_a_bad_accounts_file_is_a_usage_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "accounts"
    path.write_text(f"alice:{make_hash('pw')}\nbob:{make_hash('pw')}:admin\n")
    line = usage_error(run_cli("--mode", "chat", "--accounts", str(path)), "--accounts")
    assert f"{path}: line 2: bob: expected 'op' after the hash" in line
    missing = tmp_path / "missing"
    line = usage_error(run_cli("--mode", "chat", "--accounts", str(missing)), "--accounts")
    assert f"cannot read {missing}: No such file or directory" in line
    line = usage_error(run_cli("--password", str(missing)), "--password")
    assert "cannot read" in line


def test_accounts_and_the_join_password_need_chat_mode(accounts_file: Path) -> None:
    line = usage_error(run_cli("--accounts", str(accounts_file)), "--accounts")
    assert "--accounts needs --mode chat" in line


# --- operators ----------------------------------------------------------------------------


def test_an_operator_kicks_and_everyone_is_told_who_did_it(chat: ServerProcess) -> None:
    op = join(chat)
    target = join(chat, op)
    other = join(chat, op, target)
    login(op, "olga", target, other)
    target.say(f"/kick {other.name}")
    target.expect("*** /kick is for operators only\n")
    op.say("/kick nobody")
    op.expect("*** kick: nobody called nobody here\n")
    op.say("/kick olga")
    op.expect("*** kick: that is you\n")
    op.say(f"/kick {target.name} flooding the chat")
    target.expect("*** kicked by olga: flooding the chat\n")
    assert target.lines.rest_until_eof() == b""
    for watcher in (op, other):
        watcher.expect(f"*** {target.name} was kicked by olga: flooding the chat\n",
                       f"*** {target.name} left lobby\n")
    event = event_of(chat, "chat.kick", name=target.name)
    assert event["by"] == "olga" and event["reason"] == "flooding the chat"
    assert chat.wait_closed(target.client)["reason"] == "kicked"


def test_a_muted_client_says_nothing_to_anyone_until_the_mute_is_lifted(
    chat: ServerProcess,
) -> None:
    op = join(chat)
    loud = join(chat, op)
    other = join(chat, op, loud)
    login(op, "olga", loud, other)
    loud.say(f"/mute {other.name}")
    loud.expect("*** /mute is for operators only\n")
    op.say(f"/mute {loud.name} ten")
    op.expect("*** mute: minutes are a whole number from 0 (lifts a mute) to 10080\n")
    op.say(f"/mute {loud.name} 5")
    loud.expect("*** you are muted by olga for 5 minutes\n")
    for watcher in (op, other):
        watcher.expect(f"*** {loud.name} was muted by olga for 5 minutes\n")
    loud.say("anyone there?")
    loud.expect("*** you are muted for 5 more minutes\n")
    loud.say("/me shouts")
    loud.expect("*** you are muted for 5 more minutes\n")
    loud.say(f"/msg {other.name} psst")
    loud.expect("*** you are muted for 5 more minutes\n")
    loud.say("/who")  # commands that say nothing still work
    names = ", ".join(sorted((loud.name, "olga", other.name), key=str.lower))
    loud.expect(f"*** 3 in lobby: {names}\n")
    event = event_of(chat, "chat.mute", name=loud.name, minutes=5)
    assert event["by"] == "olga"
    op.say(f"/mute {loud.name} 0")
    loud.expect("*** olga lifted your mute\n")
    for watcher in (op, other):
        watcher.expect(f"*** olga lifted the mute of {loud.name}\n")
    loud.say("back again")
    for watcher in (op, other):
        watcher.expect(f"<{loud.name}> back again\n")  # and nothing from before
    event_of(chat, "chat.mute", name=loud.name, minutes=0)
    for chatter in (op, loud, other):
        chatter.quiet()


def test_the_topic_is_set_by_operators_and_shown_to_newcomers(chat: ServerProcess) -> None:
    op = join(chat)
    other = join(chat, op)
    other.say("/topic")
    other.expect("*** no topic is set in lobby\n")
    other.say("/topic my topic")
    other.expect("*** topic: only operators set the topic\n")
    login(op, "olga", other)
    op.say("/topic homework: \x1b[31mchapter 3")
    op.expect("*** you set the topic of lobby: homework: ^[[31mchapter 3\n")
    other.expect("*** olga set the topic of lobby: homework: ^[[31mchapter 3\n")
    other.say("/topic")
    other.expect("*** topic of lobby: homework: ^[[31mchapter 3 (set by olga)\n")
    newcomer = chat.connect()
    lines = Lines(newcomer.sock)
    assert WELCOME.fullmatch(lines.line())
    assert lines.line() == b"*** topic of lobby: homework: ^[[31mchapter 3 (set by olga)\n"
    event = chat.wait_event("chat.topic", by="olga")
    assert event["topic"] == "homework: ^[[31mchapter 3"


# --- the join password --------------------------------------------------------------------


PROMPT = b"*** this chat needs a password: /pass PASSWORD\n"


@pytest.fixture
def locked(start_server: StartServer, tmp_path: Path) -> ServerProcess:
    secret = tmp_path / "secret"
    secret.write_text("open sesame\n")
    return start_server("--mode", "chat", "--password", str(secret), "--history", "5")


def held(server: ServerProcess, source: str = HOST) -> tuple[Client, Lines]:
    client = connect_from(server, source)
    lines = Lines(client.sock)
    assert lines.line() == PROMPT
    return client, lines


def test_nothing_but_the_password_until_it_is_given(locked: ServerProcess) -> None:
    client, lines = held(locked)
    client.sock.sendall(b"/pass open sesame\nfirst words\n")
    match = WELCOME.fullmatch(lines.line())
    assert match is not None
    inside = Chatter(client, match.group(1).decode(), lines)
    waiting, waiting_lines = held(locked)
    waiting.sock.sendall(b"/who\nhello?\n")
    assert waiting_lines.line() == PROMPT
    assert waiting_lines.line() == b"*** wrong password (next try in 1 s)\n"
    inside.say("a secret for members")
    inside.say("/who")
    inside.expect(f"*** 1 in lobby: {inside.name}\n")  # the held one is nobody yet
    waiting.sock.sendall(b"open sesame\n")  # the right one, too soon
    assert waiting_lines.line() == b"*** too many tries; wait 1 s\n"
    deadline = time.monotonic() + WAIT
    while True:
        waiting.sock.sendall(b"open sesame\n")
        answer = waiting_lines.line()
        if answer != b"*** too many tries; wait 1 s\n" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    match = WELCOME.fullmatch(answer)
    assert match is not None, answer
    name = match.group(1).decode()
    inside.expect(f"*** {name} joined lobby\n")
    failed = locked.wait_event("chat.pass_failed", peer=waiting.peer)
    assert failed["wait"] == 1.0
    for line in locked.lines():
        assert "open sesame" not in line and "hello?" not in line
    inside.quiet()  # nothing the held one typed reached anyone


def test_a_held_newcomer_may_leave_and_is_closed_at_a_stop(locked: ServerProcess) -> None:
    client, lines = held(locked)
    client.sock.sendall(b"/QUIT\n")
    assert lines.line() == b"*** bye\n"
    assert lines.rest_until_eof() == b""
    other, other_lines = held(locked)
    locked.send_signal(signal.SIGTERM)
    assert other_lines.line() == b"*** the server is shutting down\n"
    assert other_lines.rest_until_eof() == b""
    assert locked.wait_exit() == 0
    assert locked.wait_closed(other)["reason"] == "server_shutdown"


def test_the_join_password_file_loses_its_trailing_newline_only(
    start_server: StartServer, tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"two  words\r\n")
    server = start_server("--mode", "chat", "--password", str(secret))
    client, lines = held(server)
    client.sock.sendall(b"/pass two  words\n")
    assert lines.line() == welcome("user1")


def test_each_room_has_its_topic_and_loses_it_when_it_is_gone(chat: ServerProcess) -> None:
    op = join(chat)
    other = join(chat, op)
    login(op, "olga", other)
    op.say("/join math")
    op.expect("*** you are now in math\n")
    other.expect("*** olga left lobby\n")
    op.say("/topic fractions")
    op.expect("*** you set the topic of math: fractions\n")
    other.say("/topic")
    other.expect("*** no topic is set in lobby\n")  # the lobby's is its own
    other.say("/join MATH")
    other.expect("*** you are now in math\n", "*** topic of math: fractions (set by olga)\n")
    op.expect(f"*** {other.name} joined math\n")
    # a kick from another room: the target's room is told, and so is the operator
    other.say("/part")
    other.expect("*** you are now in lobby\n")
    op.expect(f"*** {other.name} left math\n")
    watcher = join(chat, other)
    op.say(f"/kick {other.name}")
    other.expect("*** kicked by olga\n")
    op.expect(f"*** {other.name} was kicked by olga\n")
    watcher.expect(f"*** {other.name} was kicked by olga\n", f"*** {other.name} left lobby\n")
    op.say("/part")  # math is empty now: gone, topic and all
    op.expect("*** you are now in lobby\n")
    watcher.expect("*** olga joined lobby\n")
    op.say("/join math")
    op.expect("*** you are now in math\n")
    watcher.expect("*** olga left lobby\n")
    op.say("/topic")
    op.expect("*** no topic is set in math\n")


def test_a_browser_gives_the_join_password_and_can_be_kicked(
    start_server: StartServer, tmp_path: Path, accounts_file: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("open sesame\n")
    server = start_server("--mode", "chat", "--password", str(secret), "--accounts",
                          str(accounts_file), "--web-port", "0")
    with ws_connect(web_port(server)) as browser:
        lines = WsLines(browser)
        lines.expect(PROMPT.decode())
        browser.send("open sesame")
        match = WELCOME.fullmatch(lines.line().encode())
        assert match is not None
        client, op_lines = held(server)
        client.sock.sendall(f"open sesame\n/login olga {PASSWORDS['olga']}\n".encode())
        assert WELCOME.fullmatch(op_lines.line())
        assert op_lines.line() == b"*** logged in as olga, an operator\n"
        lines.expect("*** user2 joined lobby\n", "*** user2 is now olga\n")
        client.sock.sendall(f"/kick {match.group(1).decode()} bye now\n".encode())
        lines.expect("*** kicked by olga: bye now\n")
        with pytest.raises(ConnectionClosed) as closed:
            browser.recv(WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
