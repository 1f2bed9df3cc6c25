"""Rooms, private messages and history per room, as people see them: real servers, real sockets.

Everyone starts in ``lobby``; ``/join ROOM`` goes to a room (made by the first to join it, gone
with its last member), ``/part`` back to the lobby; a line reaches its sender's room only.
``/msg NAME text`` reaches one person, in whatever room or on whatever instance. Each check
says what every person present sees, in order, and "nothing else" only after a later line
proved the server got that far.
"""

from __future__ import annotations

from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest
from chat_harness import Chatter, join, join_many
from conftest import HOST, ServerProcess, StartServer, run_cli, usage_error
from redis_harness import RedisServer, bug_free
from test_redis import start_instance

pytest_plugins = ["redis_harness"]

CHAT = ("--mode", "chat")
ROOM_MAX = 32  # characters in a room name, as the server's refusal says


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    yield from bug_free(start_server)


@pytest.fixture
def chat(start_server: StartServer) -> ServerProcess:
    return start_server(*CHAT)


def goes(chatter: Chatter, room: str, *left_behind: Chatter, old: str = "lobby") -> None:
    """``chatter`` types ``/join room``: it is told, and so is everyone it leaves behind."""
    chatter.say(f"/join {room}")
    chatter.expect(f"*** you are now in {room}\n")
    for other in left_behind:
        other.expect(f"*** {chatter.name} left {old}\n")


def test_a_line_reaches_its_senders_room_only(chat: ServerProcess) -> None:
    a, b, c = join_many(chat, 3)
    goes(b, "math", a, c)
    c.say("/join math")
    c.expect("*** you are now in math\n")
    a.expect(f"*** {c.name} left lobby\n")
    b.expect(f"*** {c.name} joined math\n")
    b.say("x + y")
    c.expect(f"<{b.name}> x + y\n")
    c.say("/me thinks")
    b.expect(f"* {c.name} thinks\n")
    a.say("anyone?")  # alone in the lobby: nobody gets it
    a.say("/who")  # (its answer: the server took the line before d comes)
    a.expect(f"*** 1 in lobby: {a.name}\n")
    d = join(chat, a)  # the lobby is told of d; math is not
    d.say("hello lobby")
    a.expect(f"<{d.name}> hello lobby\n")
    b.say("math only")
    c.expect(f"<{b.name}> math only\n")
    a.quiet()
    d.quiet()
    b.quiet()


def test_rooms_lists_every_room_with_its_size_and_a_room_goes_with_its_last_member(
    chat: ServerProcess,
) -> None:
    a, b, c = join_many(chat, 3)
    a.say("/rooms")
    a.expect("*** 1 room: lobby (3)\n")
    goes(b, "zoo", a, c)
    goes(c, "art", a)
    c.say("/rooms")
    c.expect("*** 3 rooms: lobby (1), art (1), zoo (1)\n")
    c.say("/part")
    c.expect("*** you are now in lobby\n")
    a.expect(f"*** {c.name} joined lobby\n")
    a.say("/rooms")
    a.expect("*** 2 rooms: lobby (2), zoo (1)\n")  # art went with c
    b.say("/who")
    b.expect(f"*** 1 in zoo: {b.name}\n")
    a.say("/who")
    a.expect(f"*** 2 in lobby: {', '.join(sorted([a.name, c.name], key=str.lower))}\n")


def test_room_names_are_found_in_any_case_and_shown_as_first_given(chat: ServerProcess) -> None:
    a, b = join_many(chat, 2)
    goes(a, "Math", b)
    b.say("/join #MATH")  # a leading # is allowed, as IRC users type it
    b.expect("*** you are now in Math\n")
    a.expect(f"*** {b.name} joined Math\n")
    b.say("/join math")
    b.expect("*** you are in Math already\n")
    b.say("/part")
    b.expect("*** you are now in lobby\n")
    a.expect(f"*** {b.name} left Math\n")
    b.say("/part")
    b.expect("*** you are in lobby already\n")
    b.say("/JOIN équipe")
    b.expect("*** you are now in équipe\n")
    b.say("/rooms")
    b.expect("*** 3 rooms: lobby (0), Math (1), équipe (1)\n")


@pytest.mark.parametrize(
    ("typed", "answer"),
    [
        pytest.param("/join", "*** usage: /join ROOM\n", id="no-name"),
        pytest.param("/join " + "r" * (ROOM_MAX + 1),
                     f"*** join: a room name has at most {ROOM_MAX} characters, not "
                     f"{ROOM_MAX + 1}\n", id="too-long"),
        pytest.param("/join " + "é" * (ROOM_MAX + 1),
                     f"*** join: a room name has at most {ROOM_MAX} characters, not "
                     f"{ROOM_MAX + 1}\n", id="too-long-in-characters"),
        pytest.param("/join bell\x07room",
                     '*** join: "bell^Groom" has control characters: a room name has none\n',
                     id="control-character"),
        pytest.param("/join esc\x1b[2J",
                     '*** join: "esc^[[2J" has control characters: a room name has none\n',
                     id="escape"),
        pytest.param("/join c1\u009bx",
                     '*** join: "c1\ufffdx" has control characters: a room name has none\n',
                     id="c1-control"),
        pytest.param("/join two words",
                     '*** join: "two words" is not a room name: one word of letters, digits or '
                     'punctuation, without # or @ in front\n', id="blank"),
        pytest.param("/join bidi\u202eevil",
                     '*** join: "bidi<U+202E>evil" is not a room name: one word of letters, '
                     'digits or punctuation, without # or @ in front\n', id="invisible"),
        pytest.param("/join @alice",
                     '*** join: "@alice" is not a room name: one word of letters, digits or '
                     'punctuation, without # or @ in front\n', id="at-sign"),
    ],
)
def test_a_bad_room_name_gets_one_line_and_changes_nothing(
    chat: ServerProcess, typed: str, answer: str,
) -> None:
    a, b = join_many(chat, 2)
    a.say(typed)
    a.expect(answer)
    a.say("/who")
    a.expect(f"*** 2 in lobby: {a.name}, {b.name}\n")
    a.say("/rooms")
    a.expect("*** 1 room: lobby (2)\n")
    a.say("still here")
    b.expect(f"<{a.name}> still here\n")  # and no leave notice before it
    a.quiet()
    b.quiet()


def test_help_lists_the_room_commands_and_msg(chat: ServerProcess) -> None:
    (a,) = join_many(chat, 1)
    a.say("/help")
    a.say("/rooms")  # its answer ends the list
    lines = []
    while not (line := a.line()).startswith(b"*** 1 room"):
        lines.append(line)
    usages = {line.removeprefix(b"*** ").split(b"  ")[0].strip() for line in lines}
    assert {b"/join ROOM", b"/part", b"/rooms", b"/msg NAME TEXT", b"/who"} <= usages, lines


def test_msg_reaches_one_person_in_any_room_marked_private_on_both_sides(
    chat: ServerProcess,
) -> None:
    a, b, c = join_many(chat, 3)
    a.say("/nick alice")
    a.expect("*** you are now alice\n")
    b.expect("*** user1 is now alice\n")
    c.expect("*** user1 is now alice\n")
    goes(c, "math", a, b)
    a.say("/msg USER3 psst \x1b[2J")  # any case; cleaned like any line
    a.expect(f"-> *{c.name}* psst ^[[2J\n")
    c.expect("*alice* psst ^[[2J\n")
    c.say("/msg alice got it")
    c.expect("-> *alice* got it\n")
    a.expect(f"*{c.name}* got it\n")
    a.say("public")
    b.expect("<alice> public\n")  # b got neither private line before it
    b.quiet()
    c.quiet()


@pytest.mark.parametrize(
    ("typed", "answer"),
    [
        pytest.param("/msg zed hello", "*** msg: nobody here is called zed\n", id="unknown"),
        pytest.param("/msg bad*name hi", "*** msg: nobody here is called bad*name\n",
                     id="not-a-name"),
        pytest.param("/msg user2", "*** usage: /msg NAME TEXT\n", id="no-text"),
        pytest.param("/msg", "*** usage: /msg NAME TEXT\n", id="nothing"),
        pytest.param("/msg user1 me", "*** msg: that is you\n", id="self"),
    ],
)
def test_a_msg_that_reaches_nobody_gets_one_line(
    chat: ServerProcess, typed: str, answer: str,
) -> None:
    a, b = join_many(chat, 2)
    assert a.name == "user1" and b.name == "user2"
    a.say(typed)
    a.expect(answer)
    a.say("after")
    b.expect("<user1> after\n")
    a.quiet()
    b.quiet()


def test_a_newcomer_to_a_room_gets_that_rooms_recent_lines_only(
    start_server: StartServer,
) -> None:
    server = start_server(*CHAT, "--history", "10")
    a = join(server)
    b = join(server, a)
    b.expect_replay(f"*** {a.name} joined lobby\n")
    lobby = [f"*** {a.name} joined lobby\n", f"*** {b.name} joined lobby\n"]
    a.say("in the lobby")
    b.expect(f"<{a.name}> in the lobby\n")
    lobby.append(f"<{a.name}> in the lobby\n")
    a.say("/join math")
    a.expect("*** you are now in math\n")  # a new room: no history, no frame
    b.expect(f"*** {a.name} left lobby\n")
    lobby.append(f"*** {a.name} left lobby\n")
    math = [f"*** {a.name} joined math\n"]
    for text in ("x = 1", "y = 2"):
        a.say(text)
        math.append(f"<{a.name}> {text}\n")
    a.say("/who")  # (its answer: the server took the lines before b comes)
    a.expect(f"*** 1 in math: {a.name}\n")
    b.say("/join math")
    b.expect("*** you are now in math\n")
    b.expect_replay(*math)
    a.expect(f"*** {b.name} joined math\n")
    lobby.append(f"*** {b.name} left lobby\n")
    c = join(server)  # the lobby's history: none of math's lines
    c.expect_replay(*lobby)
    c.say("/join math")
    c.expect("*** you are now in math\n")
    c.expect_replay(*math, f"*** {b.name} joined math\n")
    a.expect(f"*** {c.name} joined math\n")
    b.expect(f"*** {c.name} joined math\n")


def test_a_room_gone_leaves_its_history_to_whoever_makes_it_again(
        start_server: StartServer) -> None:
    server = start_server(*CHAT, "--history", "10")
    (a,) = join_many(server, 1)
    a.say("/join tmp")
    a.expect("*** you are now in tmp\n")
    a.say("said in tmp")  # kept in tmp's history, which outlives the room
    a.say("/part")
    a.expect("*** you are now in lobby\n")
    a.expect_replay(f"*** {a.name} joined lobby\n", f"*** {a.name} left lobby\n")
    a.say("/rooms")
    a.expect("*** 1 room: lobby (1)\n")  # tmp is gone
    a.say("/join tmp")  # made anew, with the old one's past
    a.expect("*** you are now in tmp\n")
    a.expect_replay(f"*** {a.name} joined tmp\n", f"<{a.name}> said in tmp\n",
                    f"*** {a.name} left tmp\n")
    a.say("/rooms")
    a.expect("*** 2 rooms: lobby (0), tmp (1)\n")


def newest(lines: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """The newest (room, line) pairs whose lines fit ``limit`` bytes together, in order."""
    out: list[tuple[str, str]] = []
    size = 0
    for room, line in reversed(lines):
        if size + len(line.encode()) > limit:
            break
        out.append((room, line))
        size += len(line.encode())
    return out[::-1]


def test_all_rooms_share_the_history_bytes_the_oldest_line_of_all_going_first(
    start_server: StartServer,
) -> None:
    limit = 260
    server = start_server(*CHAT, "--history", "10", "--history-bytes", str(limit))
    said: list[tuple[str, str]] = []  # (room, line) as the server kept them, in order
    a = join(server)
    said.append(("lobby", f"*** {a.name} joined lobby\n"))
    b = join(server, a)
    b.expect_replay(*(line for _, line in said))
    said.append(("lobby", f"*** {b.name} joined lobby\n"))
    goes(a, "r1", b)
    said += [("lobby", f"*** {a.name} left lobby\n"), ("r1", f"*** {a.name} joined r1\n")]
    goes(b, "r2")
    said += [("lobby", f"*** {b.name} left lobby\n"), ("r2", f"*** {b.name} joined r2\n")]
    for chatter, room in ((a, "r1"), (b, "r2")):
        for i in range(3):
            text = f"{room} line {i} ".ljust(40, ".")
            chatter.say(text)
            said.append((room, f"<{chatter.name}> {text}\n"))
        chatter.say("/who")  # (its answer: the server took the lines before the next ones)
        chatter.expect(f"*** 1 in {room}: {chatter.name}\n")
    c = join(server)  # nobody in the lobby
    lobby = [line for room, line in newest(said, limit) if room == "lobby"]
    if lobby:  # (none with these sizes: then no frame at all, as the next line shows)
        c.expect_replay(*lobby)
    said.append(("lobby", f"*** {c.name} joined lobby\n"))
    c.say("/join r1")
    c.expect("*** you are now in r1\n")
    said.append(("lobby", f"*** {c.name} left lobby\n"))
    kept = newest(said, limit)
    assert len(kept) < len(said) and {"r1", "r2"} <= {room for room, _ in kept}  # (the test's)
    c.expect_replay(*(line for room, line in kept if room == "r1"))
    a.expect(f"*** {c.name} joined r1\n")
    c.quiet()


def test_tz_gives_the_replays_times_in_that_zone(start_server: StartServer) -> None:
    zone = "Asia/Kolkata"  # UTC+05:30: its HH:MM is never UTC's
    server = start_server(*CHAT, "--history", "5", "--tz", zone)
    a = join(server)
    a.say("namaste")
    a.say("/who")  # (its answer: the server took the line before b comes)
    a.expect(f"*** 1 in lobby: {a.name}\n")
    b = join(server, a)
    b.expect_replay(f"*** {a.name} joined lobby\n", f"<{a.name}> namaste\n",
                    zone=ZoneInfo(zone))


@pytest.mark.parametrize(
    ("args", "wording"),
    [
        pytest.param(["--mode", "chat", "--tz", "Mars/Olympus"], "invalid time zone",
                     id="unknown-zone"),
        pytest.param(["--mode", "chat", "--tz", "../etc/passwd"], "invalid time zone",
                     id="a-path"),
        pytest.param(["--mode", "chat", "--tz", ""], "invalid time zone", id="empty"),
        pytest.param(["--tz", "UTC"], "--tz needs --mode chat", id="raw-mode"),
    ],
)
def test_a_bad_tz_exits_2_with_one_line_naming_it(args: list[str], wording: str) -> None:
    line = usage_error(run_cli("--host", HOST, "--port", "0", *args), "--tz")
    assert wording in line, line


# -- across instances (a real Redis) ----------------------------------------------------------


def test_rooms_and_msg_work_across_instances(
    start_server: StartServer, redis_server: RedisServer,
) -> None:
    one = start_instance(start_server, redis_server, *CHAT)
    two = start_instance(start_server, redis_server, *CHAT)
    alice = join(one)
    two.wait_event("redis.received")  # alice's join notice, for nobody there yet
    bob = join(two, alice)
    carol = join(one, alice, bob)
    goes(alice, "math", bob, carol)
    bob.say("/join math")
    bob.expect("*** you are now in math\n")
    alice.expect(f"*** {bob.name} joined math\n")  # through Redis, to math on one only
    carol.expect(f"*** {bob.name} left lobby\n")
    bob.say("across")
    alice.expect(f"<{bob.name}> across\n")
    alice.say("back")
    bob.expect(f"<{alice.name}> back\n")
    carol.say("lobby only")  # nobody else is in the lobby, here or there
    carol.say(f"/msg {bob.name} psst")  # carol on one, in the lobby; bob on two, in math
    carol.expect(f"-> *{bob.name}* psst\n")
    bob.expect(f"*{carol.name}* psst\n")  # the next line after carol's: it was not for him
    bob.say(f"/msg {carol.name} ok")
    bob.expect(f"-> *{carol.name}* ok\n")
    carol.expect(f"*{bob.name}* ok\n")
    alice.say("math only")
    bob.expect(f"<{alice.name}> math only\n")  # and no /msg echo before it
    bob.say("/part")
    bob.expect("*** you are now in lobby\n")
    alice.expect(f"*** {bob.name} left math\n")
    carol.expect(f"*** {bob.name} joined lobby\n")
    for chatter in (alice, bob, carol):
        chatter.quiet()


def test_a_foreign_payload_goes_where_its_head_says_or_to_the_lobby(
    start_server: StartServer, redis_server: RedisServer,
) -> None:
    server = start_instance(start_server, redis_server, *CHAT)
    a, b = join_many(server, 2)
    goes(b, "math", a)
    redis_server.publish("fsmchat", b"#MATH\r\nto math \x1b[1m")
    b.expect("to math ^[[1m\n")
    redis_server.publish("fsmchat", b"@" + a.name.encode() + b"\n*x* hi")
    a.expect("*x* hi\n")
    redis_server.publish("fsmchat", b"#bad room\nall of it")  # no head: the lobby, whole
    a.expect("#bad room\n", "all of it\n")
    redis_server.publish("fsmchat", b"#nobody-here\nlost")  # no room here: for nobody here
    redis_server.publish("fsmchat", b"@nobody\nlost too")
    redis_server.publish("fsmchat", b"plain")
    a.expect("plain\n")  # (one subscriber, in order: the payloads before it were handled)
    a.quiet()
    b.quiet()
