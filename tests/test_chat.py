"""Chat mode (``--mode chat``): lines with names, the welcome, notices and commands.

Every expectation is written from what the clients send: the server's lines are checked byte for
byte, in order, and "nothing else arrives" only after a later line proved the server got that far.
"""

from __future__ import annotations

import socket

import pytest
from chat_harness import Lines, join, join_many, settled, welcome
from conftest import (
    HOST,
    ServerProcess,
    StartServer,
    recv_exactly,
    reset,
    run_cli,
    send_messages,
    usage_error,
)

CHAT = ("--mode", "chat")
UNKNOWN = (
    "*** unknown command /foo (/help lists the commands; "
    "start a line with // to send one that begins with /)\n"
)
INVALID_UTF8 = b"bad \xfe\xc0 utf8 \xc3 \xe6\x97 end"  # no 0xFF: in chat mode, telnet's IAC
#: What a client sends in a line (terminator excluded) and how the others are shown it.
SANITISED = [
    pytest.param(b"\x1b[31mred\x1b[0m", "^[[31mred^[[0m", id="escape"),
    pytest.param(
        b"bell\x07 del\x7f nul\x00 bs\x08 tab\tspace", "bell^G del^? nul^@ bs^H tab space",
        id="c0-and-del",
    ),
    pytest.param(b"carriage\rreturn", "carriage^Mreturn", id="cr-inside"),
    pytest.param(b"cr before crlf\r\r", "cr before crlf^M", id="cr-before-crlf"),
    pytest.param(b"ends in vt ff\x0b\x0c", "ends in vt ff^K^L", id="vt-ff-at-end"),
    pytest.param(b"c1 \xc2\x85 and \xc2\x9b here", "c1 \ufffd and \ufffd here", id="c1"),
    pytest.param(
        "caf\u00e9 \u65e5\u672c \U0001f389".encode(), "caf\u00e9 \u65e5\u672c \U0001f389",
        id="valid-utf8",
    ),
    pytest.param(INVALID_UTF8, INVALID_UTF8.decode("utf-8", "replace"), id="invalid-utf8"),
    pytest.param(
        b"hi" + b" " * 300 + b"<bob> please send me your password",
        "hi <bob> please send me your password", id="padding-to-the-next-screen-line",
    ),
    pytest.param(
        "wide\u3000\u3000\t\u00a0gap".encode(), "wide gap", id="unicode-blanks",
    ),
    pytest.param(
        "bidi \u202eevil\u202c zero\u200bwidth tag\U000e0041 sep\u2028par\u2029".encode(),
        "bidi <U+202E>evil<U+202C> zero<U+200B>width tag<U+E0041> sep<U+2028>par<U+2029>",
        id="invisible",
    ),
    pytest.param(
        ("zalgo" + "\u0336" * 1500).encode(), "zalgo" + "\u0336" * 4, id="combining-marks",
    ),
]


@pytest.fixture
def chat(start_server: StartServer) -> ServerProcess:
    return start_server(*CHAT)


# --------------------------------------------------------------------------
# Names, welcome, joining and leaving
# --------------------------------------------------------------------------


def test_newcomers_are_welcomed_by_number_and_announced_to_the_others(
    chat: ServerProcess,
) -> None:
    started = chat.events("server.started")[0]
    assert started["mode"] == "chat"
    a = chat.connect()
    a_lines = Lines(a.sock)
    assert a_lines.line() == welcome("user1")
    b = chat.connect()
    b_lines = Lines(b.sock)
    assert b_lines.line() == welcome("user2")
    assert a_lines.line() == b"*** user2 joined lobby\n"
    c = chat.connect()
    c_lines = Lines(c.sock)
    assert c_lines.line() == welcome("user3")
    assert a_lines.line() == b"*** user3 joined lobby\n"
    assert b_lines.line() == b"*** user3 joined lobby\n"
    # The newcomer is not told of its own arrival: C's first line after the welcome is A's.
    a.sock.sendall(b"hi\n")
    assert c_lines.line() == b"<user1> hi\n"
    assert b_lines.line() == b"<user1> hi\n"
    a_lines.quiet()


def test_raw_is_the_default_mode(start_server: StartServer) -> None:
    server = start_server()
    assert server.events("server.started")[0]["mode"] == "raw"


def test_a_line_reaches_every_other_client_with_the_name_and_is_not_echoed(
    chat: ServerProcess,
) -> None:
    a, b, c = join_many(chat, 3)
    a.say("hello")
    b.expect("<user1> hello\n")
    c.expect("<user1> hello\n")
    # B answers after A spoke: if A had been echoed its own line, it would come first.
    b.say("hi a")
    a.expect("<user2> hi a\n")
    c.expect("<user2> hi a\n")
    c.say("and c")
    a.expect("<user3> and c\n")
    b.expect("<user3> and c\n")
    c.quiet()  # the last speaker: no later line could show an echo to it


def test_crlf_and_lf_both_end_a_line(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.send(b"one\r\ntwo\nthree\r\nfour\n")
    b.expect("<user1> one\n", "<user1> two\n", "<user1> three\n", "<user1> four\n")
    b.say("done")
    a.expect("<user2> done\n")
    b.quiet()


def test_empty_and_blank_lines_are_ignored(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.send(b"\n\r\n   \n\t \r\nreal\n")
    b.expect("<user1> real\n")
    b.say("ok")
    a.expect("<user2> ok\n")
    b.quiet()


def test_a_client_that_disconnects_is_announced_as_left(chat: ServerProcess) -> None:
    a, b, c = join_many(chat, 3)
    reset(a.sock)
    b.expect("*** user1 left lobby\n")
    c.expect("*** user1 left lobby\n")
    closed = chat.wait_closed(a.client)
    assert closed["reason"] != "quit"
    b.say("still here")
    c.expect("<user2> still here\n")
    b.quiet()


def test_a_partial_line_pending_at_eof_is_delivered_before_the_leave_notice(
    chat: ServerProcess,
) -> None:
    a, b = join_many(chat, 2)
    a.send(b"first\nlast words without newline")
    a.sock.shutdown(socket.SHUT_WR)
    b.expect(
        "<user1> first\n",
        "<user1> last words without newline\n",
        "*** user1 left lobby\n",
    )
    assert a.lines.rest_until_eof() == b""
    assert chat.wait_closed(a.client)["reason"] == "peer_closed"


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def test_nick_renames_and_tells_everyone(chat: ServerProcess) -> None:
    a, b, c = join_many(chat, 3)
    a.say("/nick alice")
    a.expect("*** you are now alice\n")
    b.expect("*** user1 is now alice\n")
    c.expect("*** user1 is now alice\n")
    event = chat.wait_event("chat.nick", fd=a.client.fd)
    assert (event["old"], event["new"], event["level"]) == ("user1", "alice", "info")
    a.say("hello as alice")
    b.expect("<alice> hello as alice\n")
    c.expect("<alice> hello as alice\n")
    # Renamed again: one more event, with the new old name.
    a.say("/nick Al_1-x")
    a.expect("*** you are now Al_1-x\n")
    b.expect("*** alice is now Al_1-x\n")
    c.expect("*** alice is now Al_1-x\n")
    chat.wait_event("chat.nick", fd=a.client.fd, old="alice", new="Al_1-x")
    a.quiet()


@pytest.mark.parametrize(
    "name",
    ["bad name!", "x" * 17, "dot.ted", "caf\u00e9", "tab\there", "semi;colon"],
    ids=["space-bang", "17-chars", "dot", "non-ascii", "tab", "semicolon"],
)
def test_nick_refuses_what_is_not_a_name_and_tells_only_the_sender(
    chat: ServerProcess, name: str
) -> None:
    a, b = join_many(chat, 2)
    a.say(f"/nick {name}")
    refusal = a.line()
    assert refusal.startswith(b"*** nick: "), refusal
    b.say("proof")  # the next line A gets is B's: one refusal line, nothing more
    a.expect("<user2> proof\n")
    a.say("still user1")  # the next line B gets is this one: no rename notice before it
    b.expect("<user1> still user1\n")
    assert not chat.events("chat.nick")


def test_nick_refusal_text_for_a_bad_name(chat: ServerProcess) -> None:
    (a,) = join_many(chat, 1)
    a.say("/nick bad name!")
    a.expect('*** nick: "bad name!" is not a name: use 1 to 16 letters, digits, - or _\n')


def test_nick_accepts_sixteen_characters(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    name = "A" * 8 + "z9_-" * 2
    assert len(name) == 16
    a.say(f"/nick {name}")
    a.expect(f"*** you are now {name}\n")
    b.expect(f"*** user1 is now {name}\n")


def test_names_are_unique_ignoring_case(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("/nick alice")
    a.expect("*** you are now alice\n")
    b.expect("*** user1 is now alice\n")
    b.say("/nick alice")
    b.expect("*** nick: alice is taken\n")
    b.say("/nick ALICE")
    refusal = b.line()
    assert refusal.startswith(b"*** nick: ") and b"taken" in refusal, refusal
    b.say("/nick user1")  # free again: alice left it
    b.expect("*** you are now user1\n")
    a.expect("*** user2 is now user1\n")
    a.say("/nick USER1")
    refusal = a.line()
    assert refusal.startswith(b"*** nick: "), refusal
    a.say("after")
    b.expect("<alice> after\n")
    b.quiet()


@pytest.mark.parametrize("lookalike", ["aIice", "al1ce", "ALlCE", "aiice"])
def test_a_name_that_looks_like_a_present_one_is_refused(
    chat: ServerProcess, lookalike: str
) -> None:
    a, b = join_many(chat, 2)
    a.say("/nick alice")
    a.expect("*** you are now alice\n")
    b.expect("*** user1 is now alice\n")
    b.say(f"/nick {lookalike}")
    b.expect(f"*** nick: {lookalike} looks too much like alice, who is here\n")
    b.say("/nick rnallory")
    b.expect("*** you are now rnallory\n")
    a.expect("*** user2 is now rnallory\n")
    a.say("/nick mallory")
    a.expect("*** nick: mallory looks too much like rnallory, who is here\n")
    a.say(f"/nick {lookalike}")  # like its own name only: granted
    a.expect(f"*** you are now {lookalike}\n")
    b.expect(f"*** alice is now {lookalike}\n")
    assert not chat.events("lifecycle.bug")


def test_nick_alone_shows_the_usage(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("/nick")
    a.expect("*** usage: /nick NAME\n")
    a.say("x")
    b.expect("<user1> x\n")
    b.quiet()


@pytest.mark.parametrize("taken", ["user3", "USER3"])
def test_a_taken_name_is_skipped_when_numbering_newcomers(
    chat: ServerProcess, taken: str
) -> None:
    (a,) = join_many(chat, 1)
    a.say(f"/nick {taken}")
    a.expect(f"*** you are now {taken}\n")
    b = join(chat, a)
    assert b.name == "user2"
    c = join(chat, a, b)
    assert c.name == "user4"


def test_who_lists_everyone_sorted_ignoring_case_to_the_sender_only(
    chat: ServerProcess,
) -> None:
    a, b, c = join_many(chat, 3)
    a.say("/nick zed")
    a.expect("*** you are now zed\n")
    b.expect("*** user1 is now zed\n")
    c.expect("*** user1 is now zed\n")
    b.say("/nick Bob")
    b.expect("*** you are now Bob\n")
    a.expect("*** user2 is now Bob\n")
    c.expect("*** user2 is now Bob\n")
    c.say("/nick amy")
    c.expect("*** you are now amy\n")
    a.expect("*** user3 is now amy\n")
    b.expect("*** user3 is now amy\n")
    b.say("/who")
    b.expect("*** 3 in lobby: amy, Bob, zed\n")
    b.say("after who")
    a.expect("<Bob> after who\n")
    c.expect("<Bob> after who\n")
    d = join(chat, a, b, c)
    d.say("/who")
    d.expect(f"*** 4 in lobby: amy, Bob, {d.name}, zed\n")
    d.say("hello all")  # the next line the others get: no /who answer came before it
    for chatter in (a, b, c):
        chatter.expect(f"<{d.name}> hello all\n")


def test_me_sends_an_action_to_the_others(chat: ServerProcess) -> None:
    a, b, c = join_many(chat, 3)
    a.say("/nick alice")
    a.expect("*** you are now alice\n")
    b.expect("*** user1 is now alice\n")
    c.expect("*** user1 is now alice\n")
    a.say("/me waves")
    b.expect("* alice waves\n")
    c.expect("* alice waves\n")
    b.say("seen")
    a.expect("<user2> seen\n")  # and not its own action before it
    a.quiet()


def test_quit_says_bye_closes_with_reason_quit_and_tells_the_others(
    chat: ServerProcess,
) -> None:
    a, b, c = join_many(chat, 3)
    b.say("before")
    a.expect("<user2> before\n")
    a.say("/quit")
    a.expect("*** bye\n")
    assert a.lines.rest_until_eof() == b""
    assert chat.wait_closed(a.client)["reason"] == "quit"
    c.expect("<user2> before\n", "*** user1 left lobby\n")
    b.expect("*** user1 left lobby\n")
    b.say("after")
    c.expect("<user2> after\n")
    b.quiet()


def test_unknown_command_is_explained_to_the_sender_only(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("/foo bar")
    a.expect(UNKNOWN)
    a.say("visible")
    b.expect("<user1> visible\n")
    b.quiet()


def test_help_lists_every_command_one_line_each(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("/help")
    first = a.line()
    assert first.startswith(b"*** /help "), first
    lines = [first]
    a.say("/who")  # its answer ends the list
    while not (line := a.line()).startswith(b"*** 2 in lobby"):
        lines.append(line)
    usages = [line.split(b"  ")[0].removeprefix(b"*** ").strip() for line in lines]
    for usage in (b"/help", b"/nick NAME", b"/who", b"/me ACTION", b"/quit"):
        assert usage in usages, (usage, lines)
    assert all(line.startswith(b"*** /") and line.count(b"\n") == 1 for line in lines), lines
    b.say("after")
    a.expect("<user2> after\n")
    b.quiet()


def test_commands_are_case_insensitive(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("/NICK alice")
    a.expect("*** you are now alice\n")
    b.expect("*** user1 is now alice\n")
    a.say("/Me waves")
    b.expect("* alice waves\n")
    a.say("/WHO")
    a.expect("*** 2 in lobby: alice, user2\n")


def test_me_without_text_is_answered_with_its_usage(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("/me")
    a.expect("*** usage: /me ACTION\n")
    a.say("/me   ")
    a.expect("*** usage: /me ACTION\n")
    a.say("visible")
    b.expect("<user1> visible\n")  # and no empty action before it
    b.quiet()


def test_double_slash_sends_a_line_that_begins_with_a_slash(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.say("//text")
    b.expect("<user1> /text\n")
    a.say("//nick bob")
    b.expect("<user1> /nick bob\n")
    b.say("seen")
    a.expect("<user2> seen\n")
    a.quiet()


# --------------------------------------------------------------------------
# Telnet's commands
# --------------------------------------------------------------------------

IAC, WILL, WONT, DO, DONT, SB, SE, IP = 255, 251, 252, 253, 254, 250, 240, 244
TIMING_MARK, ECHO, NAWS = 6, 1, 31


def test_telnet_ctrl_c_is_answered_and_drops_the_unfinished_line(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    # What telnet sends for Ctrl-C: IAC IP, IAC DO TIMING-MARK; then it discards all output
    # until the mark is answered. Here after half a line, and cut between reads.
    send_messages(chat, a.client, [
        b"half a line", bytes((IAC,)), bytes((IP, IAC, DO)), bytes((TIMING_MARK,))])
    assert recv_exactly(a.sock, 3) == bytes((IAC, WILL, TIMING_MARK))
    a.send(b"hello\r\n")
    b.expect("<user1> hello\n")
    b.say("you hear me?")
    a.expect("<user2> you hear me?\n")


def test_telnet_options_are_refused_and_nothing_of_them_is_relayed(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    a.send(bytes((IAC, DO, ECHO, IAC, WILL, NAWS, IAC, SB, NAWS, 0, 80, 0, 24, IAC, SE))
           + b"caf" + bytes((IAC, IAC)) + b" \xc3\xa9" + bytes((IAC, WONT, ECHO, IAC, DONT, NAWS))
           + b"\n")
    assert recv_exactly(a.sock, 6) == bytes((IAC, WONT, ECHO, IAC, DONT, NAWS))
    b.expect("<user1> caf\ufffd \u00e9\n")  # IAC IAC is a byte 0xFF: not UTF-8
    b.say("ok")
    a.expect("<user2> ok\n")  # no answer to WONT or DONT came before it
    b.quiet()


# --------------------------------------------------------------------------
# Lines arrive whole
# --------------------------------------------------------------------------


def test_a_line_split_over_many_sends_arrives_whole(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    line = ("split " * 500).encode() + b"end"  # 3003 bytes: under the default --max-line
    sent = 0
    for start in range(0, len(line), 97):
        piece = line[start : start + 97]
        a.send(piece)
        sent += len(piece)
        chat.wait_received_from(a.client, sent)
    b.quiet()  # the server has every byte but the newline: nothing may go out yet
    a.send(b"\n")
    b.expect(b"<user1> " + line + b"\n")
    b.say("ok")
    a.expect("<user2> ok\n")
    b.quiet()


def test_senders_interleaving_byte_by_byte_never_mix_lines(chat: ServerProcess) -> None:
    a, b, c = join_many(chat, 3)
    streams = {
        "a": (a, b"alpha one\nalpha two is longer\n"),
        "b": (b, b"bravo first line\nb2\nb3 x\n"),
    }
    # What C must see, in the order the lines were completed at the server.
    expected: list[bytes] = []
    partial = {key: b"" for key in streams}
    counts = {key: 0 for key in streams}
    for i in range(max(len(data) for _, data in streams.values())):
        for key, (sender, data) in streams.items():
            if i >= len(data):
                continue
            byte = data[i : i + 1]
            sender.send(byte)
            counts[key] += 1
            chat.wait_received_from(sender.client, counts[key])
            if byte == b"\n":
                expected.append(f"<{sender.name}> ".encode() + partial[key] + b"\n")
                partial[key] = b""
            else:
                partial[key] += byte
    assert len(expected) == 5
    c.expect(*expected)
    a.expect(*[line for line in expected if line.startswith(b"<user2>")])
    b.expect(*[line for line in expected if line.startswith(b"<user1>")])
    for chatter in (a, b, c):
        chatter.quiet()


# --------------------------------------------------------------------------
# --max-line
# --------------------------------------------------------------------------


def cut(text: str, limit: int) -> list[bytes]:
    """A line cut into pieces of at most ``limit`` bytes, never inside a UTF-8 character."""
    pieces: list[bytes] = []
    piece = b""
    for char in text:
        encoded = char.encode()
        if len(piece) + len(encoded) > limit:
            pieces.append(piece)
            piece = b""
        piece += encoded
    pieces.append(piece)
    return pieces


def test_a_long_line_is_cut_into_pieces_with_one_warning_per_line(
    start_server: StartServer,
) -> None:
    limit = 16
    chat = start_server(*CHAT, "--max-line", str(limit))
    a, b = join_many(chat, 2)
    ascii_long = "0123456789abcdefghijklmnopqrstuvwxyzABCD"  # 40 bytes
    exact = "exactly16bytes!!"
    utf8_long = "x" + "\u00e9" * 20  # 41 bytes; a cut at 16 would split an é
    assert len(exact.encode()) == limit
    a.send((ascii_long + "\n" + exact + "\r\n" + utf8_long + "\n").encode())
    expected = [
        *cut(ascii_long, limit),
        exact.encode(),
        *cut(utf8_long, limit),
    ]
    assert [len(p) for p in cut(ascii_long, limit)] == [16, 16, 8]
    assert all(len(p) <= limit for p in expected)
    b.expect(*[b"<user1> " + piece + b"\n" for piece in expected])
    b.say("end")
    a.expect("<user2> end\n")
    b.quiet()
    settled(chat, a, b)  # the pieces went out after the cuts were decided (and logged)
    warnings = chat.events("chat.line_cut")
    assert len(warnings) == 2, f"one warning per long line (two, in one read): {warnings}"
    for warning in warnings:
        assert warning["level"] == "warning"
        assert warning["fd"] == a.client.fd
        assert warning["peer"] == a.client.peer
        assert warning["limit"] == limit


def test_each_long_line_warns_once_however_it_arrives(start_server: StartServer) -> None:
    limit = 16
    chat = start_server(*CHAT, "--max-line", str(limit))
    a, b = join_many(chat, 2)
    long_line = "L" * (3 * limit + 5)
    for start in range(0, len(long_line), 7):  # one long line over many reads
        a.send(long_line[start : start + 7])
        chat.wait_received_from(a.client, start + len(long_line[start : start + 7]))
    a.send("\n")
    b.expect(*[b"<user1> " + piece + b"\n" for piece in cut(long_line, limit)])
    a.say("M" * (limit + 1))  # a second one, in a read of its own
    b.expect(f"<user1> {'M' * limit}\n", "<user1> M\n")
    b.say("end")
    a.expect("<user2> end\n")
    settled(chat, a, b)
    warnings = chat.events("chat.line_cut")
    assert [(w["fd"], w["limit"]) for w in warnings] == [(a.client.fd, limit)] * 2


# --------------------------------------------------------------------------
# Sanitising
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "shown"), SANITISED)
def test_messages_are_sanitised(chat: ServerProcess, sent: bytes, shown: str) -> None:
    a, b = join_many(chat, 2)
    a.send(sent + b"\n")
    b.expect(b"<user1> " + shown.encode() + b"\n")
    b.say("seen")
    a.expect("<user2> seen\n")
    b.quiet()


@pytest.mark.parametrize(("sent", "shown"), SANITISED)
def test_me_actions_are_sanitised(chat: ServerProcess, sent: bytes, shown: str) -> None:
    a, b = join_many(chat, 2)
    a.send(b"/me " + sent + b"\n")
    b.expect(b"* user1 " + shown.encode() + b"\n")
    b.say("seen")
    a.expect("<user2> seen\n")
    b.quiet()


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--max-line", "1K"], "--max-line"),
        (["--mode", "raw", "--max-line", "1K"], "--max-line"),
        (["--mode", "chat", "--max-line", "15"], "--max-line"),
        (["--mode", "chat", "--max-line", "65537"], "--max-line"),
        (["--mode", "chat", "--max-line", "65K"], "--max-line"),
        (["--mode", "chat", "--max-line", "long"], "--max-line"),
        (["--mode", "chat", "--max-queue-bytes", "64K", "--max-line", "9K"], "--max-line"),
        (["--mode", "irc"], "--mode"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_chat_option_exits_2_with_one_line_naming_it(args: list[str], option: str) -> None:
    line = usage_error(run_cli("--host", HOST, "--port", "0", *args), option)
    if args[0] == "--max-line" or args[:2] == ["--mode", "raw"]:
        assert "--max-line needs --mode chat" in line


@pytest.mark.parametrize("value", ["16", "64K", "65536", "4k"])
def test_max_line_takes_16_to_64k(start_server: StartServer, value: str) -> None:
    server = start_server(*CHAT, "--max-line", value)
    assert server.events("server.started")[0]["mode"] == "chat"


def test_help_lists_the_chat_options() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result
    for option in ("--mode", "--max-line", "--history", "--history-bytes", "--stats-interval",
                   "--metrics-port"):
        assert option in result.stdout, f"{option} missing from --help"
