"""A page that lost its connection comes back with the ids of what it showed last, and is given
exactly what it missed (``chat/resume.py``): on the same server, or on another instance of the
same Redis.

Black-box: real servers (``--mode chat --web-port 0``), the ``websockets`` library's client
offering the subprotocol ``fsmchat.ids`` (``ws_harness.IdLines``: each line with the id its
frame came after), plain WebSocket and TCP clients beside it. Every "nothing else" is checked
after a later line proved the server got that far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from chat_harness import END_OF_RECENT, RECENT, STARTED, WELCOME, Chatter, join, minutes
from conftest import WAIT, ServerProcess, StartServer
from redis_harness import RedisServer, bug_free
from test_redis import start_instance
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection
from ws_harness import IDS, IdLines, WsLines, web_port, ws_connect

pytest_plugins = ["redis_harness"]

CHAT = ("--mode", "chat", "--web-port", "0")
MISSED = "*** missed while you were away:\n"
END_OF_MISSED = "*** end of missed messages\n"
TOO_OLD = "*** some messages said while you were away are too old to be shown again\n"


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    yield from bug_free(start_server)


@pytest.fixture
def jar() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def open_page(jar: contextlib.ExitStack, server: ServerProcess, *, path: str = "/ws",
              ids: bool = True) -> ClientConnection:
    return jar.enter_context(ws_connect(web_port(server), path=path, ids=ids))


def welcomed(lines: IdLines) -> str:
    """The welcome line (no id: it is for us alone); our name."""
    msg_id, line = lines.line()
    match = WELCOME.fullmatch(line.encode())
    assert msg_id is None and match is not None, f"not a welcome: {(msg_id, line)!r}"
    return match[1].decode()


def stamped(lines: IdLines, *expected: str) -> list[str]:
    """The next lines are these, each after a time and an id; the ids."""
    ids = []
    for want in expected:
        msg_id, got = lines.line()
        stamp, _, rest = got.partition(" ")
        assert rest == want, f"got {got!r}, expected a time and {want!r}"
        assert stamp.encode() in minutes(STARTED), f"{stamp!r} is no time since the tests began"
        assert msg_id is not None, f"{got!r} came without an id"
        ids.append(msg_id)
    return ids


def history(lines: IdLines) -> list[str]:
    """The framed history that comes next (each line after an id); the ids."""
    assert lines.line() == (None, RECENT.decode())
    ids = []
    while (got := lines.line()) != (None, END_OF_RECENT.decode()):
        assert got[0] is not None, f"{got!r}: history without an id"
        ids.append(got[0])
    return ids


def past(chatter: Chatter) -> None:
    """A TCP client's framed history, read to its end."""
    assert chatter.line() == RECENT
    while chatter.line() != END_OF_RECENT:
        pass


def resume_path(room: str, ids: list[str]) -> str:
    return f"/ws?room={room}&after={','.join(ids)}"


def test_an_id_client_reads_each_room_message_after_its_id_and_a_plain_client_none(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    server = start_server(*CHAT, "--history", "10")
    alice = IdLines(open_page(jar, server))
    alice_name = welcomed(alice)
    plain = open_page(jar, server, ids=False)
    assert plain.subprotocol is None
    bob = WsLines(plain)
    match = WELCOME.fullmatch(bob.line().encode())
    assert match is not None
    bob_name = match[1].decode()
    bob.expect(RECENT.decode())  # (a plain client's history: as ever, no ids)
    assert bob.line().endswith(f" *** {alice_name} joined lobby\n")
    bob.expect(END_OF_RECENT.decode())
    joined_id, = alice.said(f"*** {bob_name} joined lobby\n")
    dave = IdLines(open_page(jar, server))
    dave_name = welcomed(dave)
    # The history an id client is given: each message after its id, the frame's lines without.
    assert dave.line() == (None, RECENT.decode())
    history = stamped(dave, f"*** {alice_name} joined lobby\n", f"*** {bob_name} joined lobby\n")
    assert history[1] == joined_id
    assert dave.line() == (None, END_OF_RECENT.decode())
    dave_joined, = alice.said(f"*** {dave_name} joined lobby\n")
    bob.expect(f"*** {dave_name} joined lobby\n")

    carol = join(server)
    past(carol)
    carol.say("hi from nc")
    came = [f"*** {carol.name} joined lobby\n", f"<{carol.name}> hi from nc\n"]
    said = alice.said(*came)
    assert dave.said(*came) == said and said[0] != said[1]
    bob.expect(*came)

    alice.conn.send("my own line\n")  # not echoed: its id comes alone, to alice only
    ids = dave.said(f"<{alice_name}> my own line\n")
    bob.expect(f"<{alice_name}> my own line\n")
    alice.conn.send("/who\n")  # a reply, to alice alone: no id
    msg_id, reply = alice.line()
    assert msg_id is None and reply.startswith("*** 4 in lobby: "), reply
    # Its own lines' ids, the line it said and its join notice (came before the reply).
    assert alice.own == [history[0], *ids]
    assert dave.own == [dave_joined]
    carol.say("last")
    bob.expect(f"<{carol.name}> last\n")  # (WsLines: no frame held a line with a mark)
    bob.quiet()
    carol.expect(f"<{alice_name}> my own line\n")  # (a TCP client: no mark, ever)
    carol.quiet()


def test_raw_mode_takes_the_subprotocol_and_changes_nothing(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    """The page asks for ids whatever the mode (a browser fails a handshake whose answer names
    none of the subprotocols it offered): raw mode takes it, and sends bytes as ever."""
    server = start_server("--web-port", "0")
    conn = open_page(jar, server)
    assert conn.subprotocol == IDS
    other = open_page(jar, server, path="/ws?room=lobby&after=nonsense", ids=False)
    assert other.subprotocol is None
    other.send(b"raw bytes")
    assert conn.recv(WAIT) == b"raw bytes"  # (no mark, and the query meant nothing)
    conn.send(b"back")
    assert other.recv(WAIT) == b"back"


def test_a_page_that_comes_back_is_given_exactly_what_it_missed(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    server = start_server(*CHAT, "--history", "50")
    carol = join(server)
    page = open_page(jar, server)
    alice = IdLines(page)
    alice_name = welcomed(alice)
    history(alice)
    carol.expect(f"*** {alice_name} joined lobby\n")
    carol.say("one")
    carol.say("two")
    shown = alice.said(f"<{carol.name}> one\n", f"<{carol.name}> two\n")
    page.send("mine\n")
    carol.expect(f"<{alice_name}> mine\n")
    alice.own_id()  # (the id of "mine": read before the close)
    page.close()
    carol.expect(f"*** {alice_name} left lobby\n")

    carol.say("three")
    carol.say("/who")  # (a reply: once it came, "three" was said)
    assert carol.line().startswith(b"*** 1 in lobby: ")
    bob = join(server, carol)
    past(bob)
    bob.say("four")
    carol.expect(f"<{bob.name}> four\n")

    back = IdLines(open_page(jar, server, path=resume_path("lobby", [*shown, *alice.own])))
    name = welcomed(back)
    assert back.line() == (None, MISSED)
    missed = stamped(back, f"*** {alice_name} left lobby\n", f"<{carol.name}> three\n",
                     f"*** {bob.name} joined lobby\n", f"<{bob.name}> four\n")
    assert back.line() == (None, END_OF_MISSED)
    assert not set(missed) & {*shown, *alice.own}
    carol.expect(f"*** {name} joined lobby\n")
    bob.expect(f"*** {name} joined lobby\n")
    carol.say("five")
    back.said(f"<{carol.name}> five\n")  # live again, and nothing else came between
    back.quiet()


def test_a_page_that_missed_nothing_is_given_nothing(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    """Back before its old connection is gone (a phone that changed networks): nothing was said
    after what it showed, and it is given nothing but the welcome; then it hears its old self
    leave, live."""
    server = start_server(*CHAT, "--history", "50")
    carol = join(server)
    old = IdLines(open_page(jar, server))
    old_name = welcomed(old)
    history(old)
    carol.expect(f"*** {old_name} joined lobby\n")
    carol.say("hello")
    shown = old.said(f"<{carol.name}> hello\n")
    back = IdLines(open_page(jar, server, path=resume_path("lobby", shown)))
    name = welcomed(back)
    carol.expect(f"*** {name} joined lobby\n")
    old.conn.close()
    carol.expect(f"*** {old_name} left lobby\n")
    assert back.said(f"*** {old_name} left lobby\n")  # the first line after the welcome
    back.quiet()


def test_coming_back_to_a_room_seats_the_page_there(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    server = start_server(*CHAT, "--history", "50")
    carol, lobby = join(server), join(server)
    carol.expect(f"*** {lobby.name} joined lobby\n")
    carol.say("/join Math")
    carol.expect("*** you are now in Math\n")
    page = open_page(jar, server)
    alice = IdLines(page)
    alice_name = welcomed(alice)
    history(alice)
    page.send("/join math\n")
    alice.expect("*** you are now in Math\n")
    history(alice)
    carol.expect(f"*** {alice_name} joined Math\n")
    carol.say("x = 1")
    shown = alice.said(f"<{carol.name}> x = 1\n")
    page.close()
    carol.expect(f"*** {alice_name} left Math\n")
    carol.say("x = 2")

    back = IdLines(open_page(jar, server, path=resume_path("math", shown)))
    name = welcomed(back)
    back.expect("*** you are now in Math\n")
    assert back.line() == (None, MISSED)
    stamped(back, f"*** {alice_name} left Math\n", f"<{carol.name}> x = 2\n")
    assert back.line() == (None, END_OF_MISSED)
    carol.expect(f"*** {name} joined Math\n")
    back.conn.send("/who\n")
    assert back.text().startswith("*** 2 in Math: ")
    # The lobby heard nothing of the page's coming back: the next it hears is the page's /part.
    past(lobby)
    lobby.expect(f"*** {carol.name} left lobby\n", f"*** {alice_name} joined lobby\n",
                 f"*** {alice_name} left lobby\n")
    back.conn.send("/part\n")
    lobby.expect(f"*** {name} joined lobby\n")


def test_a_gap_older_than_the_history_is_said_and_the_history_given(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    server = start_server(*CHAT, "--history", "3")
    carol = join(server)
    page = open_page(jar, server)
    alice = IdLines(page)
    alice_name = welcomed(alice)
    history(alice)
    carol.expect(f"*** {alice_name} joined lobby\n")
    carol.say("zero")
    shown = alice.said(f"<{carol.name}> zero\n")
    page.close()
    carol.expect(f"*** {alice_name} left lobby\n")
    for text in ("one", "two", "three"):
        carol.say(text)
    carol.say("/who")  # (a reply: once it came, every line before was said)
    assert carol.line().startswith(b"*** 1 in lobby: ")

    back = IdLines(open_page(jar, server, path=resume_path("lobby", shown)))
    welcomed(back)
    back.expect(TOO_OLD, RECENT.decode())
    stamped(back, *(f"<{carol.name}> {text}\n" for text in ("one", "two", "three")))
    back.expect(END_OF_RECENT.decode())

    # An id that was never said here: the same (a page of another chat, a restart without
    # --history-file).
    other = IdLines(open_page(jar, server, path=resume_path("lobby", ["0123456789abcdef-7"])))
    welcomed(other)
    other.expect(TOO_OLD, RECENT.decode())


@pytest.mark.parametrize(("query", "words"), [
    ("after=zzz", "after: 'zzz' is not a message id"),
    ("after=", "after: '' is not a message id"),
    ("after=0123456789abcdef-0", "is not a message id"),
    ("after=0123456789ABCDEF-1", "is not a message id"),
    ("after=" + ",".join(f"0123456789abcdef-{n}" for n in range(1, 34)), "at most 32 ids"),
    ("room=a&room=b", "room is given twice"),
    ("room=two%20words", "room:"),
    ("room=", "room: a room needs a name"),
    ("room=" + "x" * 100, "room: a room name has at most"),
])
def test_a_bad_query_is_refused_with_what_is_wrong(
        start_server: StartServer, query: str, words: str) -> None:
    server = start_server(*CHAT)
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(web_port(server), path=f"/ws?{query}", ids=True)
    response = refused.value.response
    assert response.status_code == 400
    assert words in response.body.decode(), response.body
    # Other parameters are ignored; a good query still gets in.
    conn = ws_connect(web_port(server), path="/ws?cache=1&room=lobby", ids=True)
    with conn:
        welcomed(IdLines(conn))


def test_a_page_that_comes_back_to_another_instance_is_given_what_it_missed(
        start_server: StartServer, redis_server: RedisServer,
        jar: contextlib.ExitStack) -> None:
    a = start_instance(start_server, redis_server, *CHAT, "--history", "50")
    b = start_instance(start_server, redis_server, *CHAT, "--history", "50")
    carol = join(b)
    page = open_page(jar, a)
    alice = IdLines(page)
    alice_name = welcomed(alice)
    history(alice)
    carol.expect(f"*** {alice_name} joined lobby\n")
    carol.say("one")
    carol.say("two")
    shown = alice.said(f"<{carol.name}> one\n", f"<{carol.name}> two\n")
    page.send("mine\n")
    carol.expect(f"<{alice_name}> mine\n")
    alice.own_id()
    page.close()
    carol.expect(f"*** {alice_name} left lobby\n")  # (B has it: A's leave came through Redis)
    carol.say("three")

    back = IdLines(open_page(jar, b, path=resume_path("lobby", [*shown, *alice.own])))
    name = welcomed(back)
    assert back.line() == (None, MISSED)
    stamped(back, f"*** {alice_name} left lobby\n", f"<{carol.name}> three\n")
    assert back.line() == (None, END_OF_MISSED)
    carol.expect(f"*** {name} joined lobby\n")
    carol.say("four")
    back.said(f"<{carol.name}> four\n")
    back.quiet()


def test_a_plain_client_may_come_back_too_and_reads_no_ids(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    server = start_server(*CHAT, "--history", "50")
    carol = join(server)
    watcher = IdLines(open_page(jar, server))
    welcomed(watcher)
    history(watcher)
    carol.line()
    carol.say("seen")
    shown = watcher.said(f"<{carol.name}> seen\n")
    carol.say("not seen")
    watcher.said(f"<{carol.name}> not seen\n")
    plain = WsLines(open_page(jar, server, path=resume_path("lobby", shown), ids=False))
    assert WELCOME.fullmatch(plain.line().encode())
    plain.expect(MISSED)
    assert plain.line()[6:] == f"<{carol.name}> not seen\n"
    plain.expect(END_OF_MISSED)
    carol.say("live")
    plain.expect(f"<{carol.name}> live\n")


def test_without_history_a_page_that_comes_back_is_told_so(
        start_server: StartServer, jar: contextlib.ExitStack) -> None:
    server = start_server(*CHAT)
    carol = join(server)
    alice = IdLines(open_page(jar, server))
    welcomed(alice)
    carol.line()
    carol.say("hi")
    shown = alice.said(f"<{carol.name}> hi\n")
    back = IdLines(open_page(jar, server, path=resume_path("lobby", shown)))
    welcomed(back)
    back.expect("*** this server keeps no history: what was said while you were away is not "
                "shown\n")
    carol.say("live")
    back.said(f"<{carol.name}> live\n")
