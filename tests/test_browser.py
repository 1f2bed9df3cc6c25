"""The chat page in a real browser: the system's chromium, driven by Playwright, on a real server.

Each test starts ``python -m fsmchat --web-port 0`` (the port is ``web_port`` in
``server.started``), opens pages in a chromium with a fresh profile, and talks to the same chat
through plain TCP clients, as nc users would. What a page shows is read from its log
(``role="log"``, one child per line); a row's text is exactly the line the server sent, so the
tests compare it with what an nc user gets.

Run as a script, this file makes README's screenshot from a real run:
``.venv/bin/python tests/test_browser.py --screenshot docs/chat.png``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import itertools
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from chat_harness import STARTED, Chatter, join, minutes, welcome
from conftest import HOST, WAIT, ServerProcess, StartServer
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from redis_harness import RedisServer
from test_redis import start_instance

from fsmchat.chat.accounts import make_hash

pytest_plugins = ["redis_harness"]

#: Debian's chromium: there is no browser download to be had, so Playwright drives this one.
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MS = 1000 * WAIT  # Playwright counts in milliseconds
#: The page waits about 1 s, then 2 s, 4 s ... before it tries again: room for a few tries.
RECONNECT_WAIT_MS = 4 * MS
PHONE = {"width": 360, "height": 640}

# Rows in the log, read in the page. Only the structure is assumed: the log is the element
# with role="log", and each line is one of its children.
ROWS_JS = "() => [...document.querySelector('[role=log]').children].map(r => r.textContent)"
HAS_ROW_JS = """t => [...document.querySelector('[role=log]').children]
                      .some(r => r.textContent === t)"""
FIND_ROW_JS = """p => [...document.querySelector('[role=log]').children]
                      .map(r => r.textContent).find(t => new RegExp(p).test(t)) ?? null"""
LOOK_JS = """t => {
  const row = [...document.querySelector('[role=log]').children].find(r => r.textContent === t);
  const s = getComputedStyle(row);
  return [s.backgroundColor, s.color, s.fontStyle, s.fontSize].join(' | ');
}"""
WELCOME = r"^\*\*\* welcome, you are (\S+) \("


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """A chromium with a profile of its own, gone with the test's tmp_path."""
    if CHROMIUM is None:
        pytest.fail("no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
    with chromium(CHROMIUM, tmp_path / "profile") as context:
        yield context


@contextmanager
def chromium(executable: str, profile: Path) -> Iterator[BrowserContext]:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=executable, args=CHROMIUM_ARGS, headless=True,
        )
        try:
            yield context
        finally:
            context.close()


def web_port(server: ServerProcess) -> int:
    return int(server.wait_event("server.started")["web_port"])


def page_url(server: ServerProcess) -> str:
    return f"http://{HOST}:{web_port(server)}/"


def chat_server(start_server: StartServer, *extra: str) -> ServerProcess:
    return start_server("--mode", "chat", "--web-port", "0", *extra)


@dataclass
class ChatPage:
    """One browser tab on the chat, with what it logged, the dialogs it opened, what it fetched."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    name: str = ""

    def rows(self) -> list[str]:
        rows: list[str] = self.page.evaluate(ROWS_JS)
        return rows

    def wait_row(self, text: str, timeout: float = MS) -> None:
        """Wait until a line of the log reads exactly ``text``."""
        try:
            self.page.wait_for_function(HAS_ROW_JS, arg=text, timeout=timeout)
        except PlaywrightTimeout as exc:  # say what the log did show
            raise AssertionError(f"no row {text!r} in {self.rows()!r}") from exc

    def wait_match(self, pattern: str, timeout: float = MS) -> re.Match[str]:
        """Wait for the first line of the log matching the regular expression ``pattern``."""
        try:
            handle = self.page.wait_for_function(FIND_ROW_JS, arg=pattern, timeout=timeout)
        except PlaywrightTimeout as exc:
            raise AssertionError(f"no row matching {pattern!r} in {self.rows()!r}") from exc
        match = re.search(pattern, str(handle.json_value()))
        assert match is not None
        return match

    def look(self, text: str) -> str:
        """How the row reading ``text`` is drawn (background, colour, font style and size)."""
        return str(self.page.evaluate(LOOK_JS, text))

    def say(self, text: str, *, button: bool = False) -> None:
        """Type into the box labelled Message and press Enter (or click Send)."""
        box = self.page.get_by_label("Message", exact=True)
        box.fill(text)
        if button:
            self.page.get_by_role("button", name="Send").click()
        else:
            box.press("Enter")

    def status(self) -> str:
        return self.page.get_by_role("status").inner_text()

    def wait_status(self, pattern: str, timeout: float = MS) -> str:
        """Wait until the status line matches ``pattern``; return its text."""
        script = "p => new RegExp(p).test(document.querySelector('[role=status]').textContent)"
        try:
            self.page.wait_for_function(script, arg=pattern, timeout=timeout)
        except PlaywrightTimeout as exc:
            raise AssertionError(f"status {self.status()!r} never matched {pattern!r}") from exc
        return self.status()


def open_page(
    context: BrowserContext,
    url: str,
    *,
    viewport: dict[str, int] | None = None,
    scheme: Literal["light", "dark"] = "light",
    chat: bool = True,
    joined: bool = True,
) -> ChatPage:
    """Open the page; in chat mode wait for the welcome line and learn the page's name
    (without ``joined``: wait for nothing, the server may turn it away)."""
    page = context.new_page()
    tab = ChatPage(page)
    page.on("console", lambda m: _console(tab, m))
    page.on("pageerror", lambda e: tab.errors.append(f"pageerror: {e}"))
    page.on("dialog", lambda d: _dialog(tab, d))
    page.on("request", lambda r: tab.requests.append(r.url))
    if viewport is not None:
        page.set_viewport_size({"width": viewport["width"], "height": viewport["height"]})
    page.emulate_media(color_scheme=scheme)
    page.goto(url)
    if not joined:
        return tab
    if chat:
        tab.name = tab.wait_match(WELCOME).group(1)
    tab.wait_status("^connected$")
    return tab


def _dialog(tab: ChatPage, dialog: Dialog) -> None:
    tab.dialogs.append(dialog.message)
    dialog.dismiss()


def _console(tab: ChatPage, message: ConsoleMessage) -> None:
    if message.type == "error":
        tab.errors.append(f"console: {message.text}")


REFUSED = re.compile(r"console: WebSocket connection to 'ws://[^']+' failed: "
                     r"Error in connection establishment: net::ERR_CONNECTION_REFUSED")
"""The browser's own report of a try while nothing listened (the page cannot silence it)."""


def errors_while_away(tab: ChatPage) -> list[str]:
    """What the page logged, but the browser's reports of tries made while its server was down."""
    return [error for error in tab.errors if not REFUSED.fullmatch(error)]


def wait_sees(tabs: list[ChatPage], terminals: list[Chatter], line: str) -> None:
    """Every page shows ``line``, and it is the next line each terminal reads."""
    for tab in tabs:
        tab.wait_row(line)
    for terminal in terminals:
        terminal.expect(line + "\n")


# --------------------------------------------------------------------------
# Browsers and terminals in one chat
# --------------------------------------------------------------------------


def test_two_pages_and_a_terminal_chat_together(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    url = page_url(server)
    alice = open_page(browser, url)
    bob = open_page(browser, url)
    alice.wait_row(f"*** {bob.name} joined lobby")
    term = join(server)
    wait_sees([alice, bob], [], f"*** {term.name} joined lobby")

    said = f"<{alice.name}> hello from a browser"
    alice.say("hello from a browser")
    wait_sees([alice, bob], [term], said)  # alice's own line too: the page shows it itself
    heard = f"<{term.name}> hello from a terminal"
    term.say("hello from a terminal")
    wait_sees([alice, bob], [], heard)
    acted = f"* {bob.name} waves"
    bob.say("/me waves")
    wait_sees([alice, bob], [term], acted)

    old = bob.name
    bob.say("/nick bobby", button=True)
    bob.wait_row("*** you are now bobby")
    wait_sees([alice], [term], f"*** {old} is now bobby")
    bob.say("renamed")  # the page learned its new name from the server's notice
    wait_sees([alice, bob], [term], "<bobby> renamed")

    alice.say("/who")
    who = alice.wait_match(r"^\*\*\* 3 in lobby: (.*)$").group(1)
    assert sorted(who.split(", ")) == sorted([alice.name, "bobby", term.name])

    # The server echoes nothing back, and the page shows each own line once.
    assert alice.rows().count(said) == 1
    assert bob.rows().count(acted) == 1
    # Own lines, others' lines, notices and actions look different.
    assert alice.look(said) != bob.look(said)
    assert alice.look(heard) != alice.look(f"*** {term.name} joined lobby")
    assert alice.look(heard) != alice.look(acted)
    assert alice.errors == [] and bob.errors == []


def test_the_page_is_labelled_for_screen_readers(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    page = open_page(browser, page_url(server)).page
    live = page.get_by_role("log").evaluate("e => e.getAttribute('aria-live') ?? 'polite'")
    assert live == "polite"  # role=log is polite unless told otherwise
    labels = page.get_by_role("textbox").evaluate_all(
        "es => es.map(e => [...e.labels].map(l => l.textContent))")
    # Real <label>s, not only placeholders: the message box, and the room list's.
    assert labels == [["Join or make a room"], ["Message"]], labels
    assert page.get_by_role("status").count() == 1
    assert page.get_by_role("button", name="Send").count() == 1
    # The room list: a landmark with a list of buttons, each named by its room and size.
    rooms = page.get_by_role("navigation", name="Rooms")
    rooms.get_by_role("list").get_by_role("listitem").get_by_role(
        "button", name="lobby, 1 person", exact=True).wait_for()
    assert rooms.get_by_role("button", name="Join").count() == 1


def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    url = page_url(server)
    alice = open_page(browser, url)
    bob = open_page(browser, url)
    term = join(server)
    for tab in (alice, bob):
        tab.wait_row(f"*** {term.name} joined lobby")
    attack = "<img src=x onerror=alert(1)>"
    alice.say(attack)
    wait_sees([alice, bob], [term], f"<{alice.name}> {attack}")
    term.say(f"{attack} <script>alert(2)</script> <b>bold</b>")
    wait_sees([alice, bob], [], f"<{term.name}> {attack} <script>alert(2)</script> <b>bold</b>")

    for tab in (alice, bob):
        assert tab.dialogs == []
        counts = tab.page.evaluate(
            "() => ['img', 'script:not([src])', 'b'].map(s => document.querySelectorAll(s).length)"
        )
        assert counts == [0, 0, 0], counts
        assert not [u for u in tab.requests if u.endswith("/x")], tab.requests
        assert tab.errors == []


def test_raw_mode_shows_bytes_as_utf8_text_without_names(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = start_server("--web-port", "0")
    tab = open_page(browser, page_url(server), chat=False)
    term = server.connect()
    term.sock.sendall(b"caf\xc3\xa9 \xff\xfe ok\r\n")
    tab.wait_row("café \ufffd\ufffd ok")
    term.sock.sendall(b"\x1b[2J gone?\n")
    tab.wait_row("^[[2J gone?")  # an escape cannot clear anything: it shows in caret notation
    tab.say("from the page")
    tab.wait_row("from the page")  # no names in raw mode: the page shows it as typed
    got = b""
    while not got.endswith(b"\n"):
        got += term.sock.recv(4096)
    assert got == b"from the page\n"
    assert tab.errors == []


# --------------------------------------------------------------------------
# Rooms, private messages, passwords and history on the page
# --------------------------------------------------------------------------

CURRENT_ROOM_JS = """() => [...document.querySelectorAll('nav [aria-current=true]')]
                           .map(b => b.dataset.room)"""


def rooms_of(tab: ChatPage) -> Locator:
    """The page's room list: a navigation landmark named Rooms."""
    return tab.page.get_by_role("navigation", name="Rooms")


def room_button(tab: ChatPage, room: str, size: int) -> Locator:
    """The room list's button for ``room`` while it says ``size`` people are there."""
    people = "person" if size == 1 else "people"
    return rooms_of(tab).get_by_role("button", name=f"{room}, {size} {people}", exact=True)


def wait_room(tab: ChatPage, room: str, size: int) -> Locator:
    button = room_button(tab, room, size)
    try:
        button.wait_for(timeout=MS)
    except PlaywrightTimeout as exc:
        shown = rooms_of(tab).get_by_role("button").evaluate_all(
            "bs => bs.map(b => b.getAttribute('aria-label'))")
        raise AssertionError(f"no button {room} ({size}) in {shown!r}") from exc
    return button


def header(tab: ChatPage) -> str:
    return tab.page.locator("header").inner_text()


def wait_header(tab: ChatPage, *parts: str) -> None:
    """Wait until the page's header shows each of ``parts``."""
    script = "ps => ps.every(p => document.querySelector('header').innerText.includes(p))"
    try:
        tab.page.wait_for_function(script, arg=list(parts), timeout=MS)
    except PlaywrightTimeout as exc:
        raise AssertionError(f"header {header(tab)!r} never showed {parts!r}") from exc


def web_fd(server: ServerProcess) -> int:
    """The descriptor of the one page connected (its WebSocket)."""
    pages = [e for e in server.events("connection.accepted") if e.get("web")]
    assert len(pages) == 1, pages
    return int(pages[0]["fd"])


def test_a_page_joins_a_room_from_its_list_and_its_lines_stay_there(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server, "--history", "20")
    mover = join(server)
    mover.say("/join math")
    mover.expect("*** you are now in math\n")
    mover.say("before the page came")
    stay = join(server)  # stays in the lobby
    stay.expect_replay(f"*** {mover.name} joined lobby\n", f"*** {mover.name} left lobby\n")
    tab = open_page(browser, page_url(server))
    stay.expect(f"*** {tab.name} joined lobby\n")

    # The list came by itself (the page asked /rooms), and the page's own questions are not
    # shown in the log.
    wait_room(tab, "lobby", 2)
    math = wait_room(tab, "math", 1)
    assert tab.page.evaluate(CURRENT_ROOM_JS) == ["lobby"]
    wait_header(tab, "lobby")
    math.click()
    tab.wait_row("/join math")  # the click typed it, as a person would
    tab.wait_row("*** you are now in math")
    stay.expect(f"*** {tab.name} left lobby\n")
    mover.expect(f"*** {tab.name} joined math\n")
    # The list follows: math has two now, the lobby one, and math is marked as ours.
    wait_room(tab, "math", 2)
    wait_room(tab, "lobby", 1)
    assert tab.page.evaluate(CURRENT_ROOM_JS) == ["math"]
    wait_header(tab, "math")
    assert "lobby" not in tab.page.locator("#place").inner_text()

    # The room's history came framed, each line after its time, and looks like the past.
    tab.wait_row("*** recent messages:")
    found = tab.wait_match(rf"^(\d\d:\d\d) <{mover.name}> before the page came$")
    before = found.group(0)
    assert found.group(1).encode() in minutes(STARTED), before
    tab.wait_row("*** end of recent messages")
    heard = f"<{mover.name}> now that you are here"
    mover.say("now that you are here")
    tab.wait_row(heard)
    assert tab.look(before) != tab.look(heard)

    tab.say("hello math")
    mover.expect(f"<{tab.name}> hello math\n")
    # Sent after the page's line reached math: if the lobby had had it, it would come first.
    mover.say(f"/msg {stay.name} are you there?")
    stay.expect(f"*{mover.name}* are you there?\n")

    rows = tab.rows()
    assert not [r for r in rows if re.match(r"^\*\*\* \d+ rooms?: ", r)], rows
    # The page asks when something changed, never because of an answer: quiet now, it sends
    # nothing more (a loop would ask again every half second).
    fd = web_fd(server)
    sent = len([e for e in server.events("data.received") if e.get("fd") == fd])
    tab.page.wait_for_timeout(1500)
    assert len([e for e in server.events("data.received") if e.get("fd") == fd]) == sent
    assert tab.errors == []


def test_a_room_typed_in_the_list_is_made_and_a_typed_rooms_is_answered_in_the_log(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    tab = open_page(browser, page_url(server))
    wait_room(tab, "lobby", 1)
    box = tab.page.get_by_label("Join or make a room")
    box.fill("équipe-2")
    box.press("Enter")
    tab.wait_row("*** you are now in équipe-2")
    wait_room(tab, "équipe-2", 1)
    wait_room(tab, "lobby", 0)
    assert box.input_value() == ""
    tab.say("/rooms")  # typed by the person: the answer is shown
    tab.wait_row("*** 2 rooms: lobby (0), équipe-2 (1)")
    tab.say("/part")
    tab.wait_row("*** you are now in lobby")
    wait_room(tab, "lobby", 1)
    assert rooms_of(tab).get_by_role("list").get_by_role("button").count() == 1  # équipe-2: gone
    wait_header(tab, "lobby")
    assert tab.errors == []


def test_private_messages_between_a_page_and_a_terminal_show_as_private(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    tab = open_page(browser, page_url(server))
    term = join(server)
    tab.wait_row(f"*** {term.name} joined lobby")
    public = f"<{term.name}> in public"
    term.say("in public")
    tab.wait_row(public)
    tab.say("me too")
    own = f"<{tab.name}> me too"
    tab.wait_row(own)
    term.expect(own + "\n")

    received = f"*{term.name}* just between us"
    term.say(f"/msg {tab.name} just between us")
    term.expect(f"-> *{tab.name}* just between us\n")
    tab.wait_row(received)
    # A name in the log starts the answer: /msg NAME in the box, to be finished.
    tab.page.get_by_role("log").get_by_role("button", name=term.name).last.click()
    box = tab.page.get_by_label("Message", exact=True)
    assert box.input_value() == f"/msg {term.name} "
    box.press_sequentially("yes, only you")
    box.press("Enter")
    term.expect(f"*{tab.name}* yes, only you\n")
    sent = f"-> *{term.name}* yes, only you"
    tab.wait_row(sent)  # the server's echo, shown once (the page does not show the command)
    rows = tab.rows()
    assert rows.count(sent) == 1 and not [r for r in rows if r.startswith("/msg")], rows
    # Private lines look like neither public lines nor each other.
    assert tab.look(received) != tab.look(public)
    assert tab.look(sent) != tab.look(own)
    assert tab.look(sent) != tab.look(received)
    assert tab.errors == []


PASSWORDS = {"alice": "wonder land", "olga": "op-secret"}
JOIN_PASSWORD = "open sesame"


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice, and olga (an operator)."""
    path = tmp_path_factory.mktemp("accounts") / "accounts"
    path.write_text("".join(f"{name}:{make_hash(password)}{':op' if name == 'olga' else ''}\n"
                            for name, password in PASSWORDS.items()))
    return path


def test_a_typed_password_is_masked_in_the_log(
    start_server: StartServer, browser: BrowserContext, accounts: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(JOIN_PASSWORD + "\n")
    server = chat_server(start_server, "--accounts", str(accounts), "--password", str(secret))
    tab = open_page(browser, page_url(server), joined=False)
    tab.wait_row("*** this chat needs a password: /pass PASSWORD")
    box = tab.page.get_by_label("Message", exact=True)
    # While the server asks for it, the box hides what is typed, and the log shows a mask.
    assert box.get_attribute("type") == "password"
    tab.say(JOIN_PASSWORD)  # a line of its own is the password, as /pass PASSWORD is
    tab.wait_row("••••")
    tab.name = tab.wait_match(WELCOME).group(1)
    assert box.get_attribute("type") == "text"
    tab.say("/pass not it")  # (unknown once in: masked all the same)
    tab.wait_row("/pass ••••")
    tab.wait_match(r"^\*\*\* unknown command /pass ")

    tab.say(f"/login alice {PASSWORDS['alice']}")
    tab.wait_row("/login alice ••••")
    tab.wait_row("*** logged in as alice")
    tab.wait_row("*** you are now alice")
    tab.say("/nick olga wrong guess")
    tab.wait_row("/nick olga ••••")
    # (within a second of the last check: refused before any is made, as a wrong one is)
    tab.wait_match(r"^\*\*\* (wrong password for olga|too many tries for olga)")
    shown = tab.page.locator("body").inner_text()
    for word in ("not it", JOIN_PASSWORD, PASSWORDS["alice"], "wrong guess"):
        assert word not in shown, (word, tab.rows())
    assert tab.errors == []


def test_the_topic_of_the_room_shows_in_the_header(
    start_server: StartServer, browser: BrowserContext, accounts: Path
) -> None:
    server = chat_server(start_server, "--accounts", str(accounts))
    op = join(server)
    op.say(f"/login olga {PASSWORDS['olga']}")
    op.expect("*** logged in as olga, an operator\n", "*** you are now olga\n")
    op.say("/join math")
    op.expect("*** you are now in math\n")
    op.say("/topic fractions, then decimals")
    op.expect("*** you set the topic of math: fractions, then decimals\n")
    tab = open_page(browser, page_url(server))
    wait_header(tab, "lobby")
    assert "fractions" not in header(tab)  # the lobby has none
    wait_room(tab, "math", 1).click()
    wait_header(tab, "math", "fractions, then decimals")
    op.expect(f"*** {tab.name} joined math\n")
    op.say("/topic decimals, then percentages")
    wait_header(tab, "math", "decimals, then percentages")
    assert "fractions" not in header(tab)
    tab.say("/part")
    tab.wait_row("*** you are now in lobby")
    wait_header(tab, "lobby")
    assert "decimals" not in header(tab)
    assert tab.errors == []


def test_on_a_phone_the_room_list_folds_behind_a_button(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    term = join(server)
    term.say("/join math")
    term.expect("*** you are now in math\n")
    tab = open_page(browser, page_url(server), viewport=PHONE)
    toggle = tab.page.get_by_role("button", name="Rooms", exact=True)
    toggle.wait_for()
    assert toggle.get_attribute("aria-expanded") == "false"
    assert not rooms_of(tab).is_visible()  # folded: the log has the screen
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true"
    math = wait_room(tab, "math", 1)
    box = math.bounding_box()
    assert box is not None and box["x"] + box["width"] <= PHONE["width"], box
    math.click()
    tab.wait_row("*** you are now in math")
    assert not rooms_of(tab).is_visible()  # chosen: folded again
    assert toggle.get_attribute("aria-expanded") == "false"
    wait_header(tab, "math")
    width = tab.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    assert tab.errors == []


# --------------------------------------------------------------------------
# Connection trouble
# --------------------------------------------------------------------------


def test_the_page_reconnects_after_the_server_restarts(
    start_server: StartServer, browser: BrowserContext
) -> None:
    first = chat_server(start_server)
    port = web_port(first)
    tab = open_page(browser, f"http://{HOST}:{port}/")
    first.stop()
    # The close frame at shutdown (1001) says why; the page says when it tries again.
    text = tab.wait_status(r"reconnecting in \d+ s")
    assert "shutting down" in text or "restarting" in text, text

    second = start_server("--mode", "chat", "--web-port", str(port))
    tab.wait_status("^connected again$", timeout=RECONNECT_WAIT_MS)
    term = join(second)
    tab.wait_row(f"*** {term.name} joined lobby")
    # A new server, a new welcome: the page's name is the last one it was given.
    name = re.findall(WELCOME, "\n".join(tab.rows()), re.MULTILINE)[-1]
    tab.say("back again")
    wait_sees([tab], [term], f"<{name}> back again")
    term.say("welcome back")
    tab.wait_row(f"<{term.name}> welcome back")


class Cable:
    """A TCP relay between the browser and the server's web port, whose connections a test can
    cut (as a network that drops: no close frame, the page learns it from its socket), hold
    (connections made meanwhile wait, unanswered, until ``mend``), and make deaf (what the
    server sends is lost on the way, as before a cut the page is not told of yet)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server((HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        self.mended = threading.Event()
        self.mended.set()
        self.deaf = threading.Event()
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.mended.wait()
            far = socket.create_connection((HOST, self.upstream), timeout=WAIT)
            far.settimeout(None)
            with self.lock:
                self.socks += [near, far]
            for source, sink, lost in ((near, far, None), (far, near, self.deaf)):
                threading.Thread(target=_pump, args=(source, sink, lost), daemon=True).start()

    def cut(self) -> None:
        """Every connection relayed so far is gone at once; new ones wait for ``mend``."""
        self.mended.clear()
        with self.lock:
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.socks.clear()

    def mend(self) -> None:
        self.deaf.clear()
        self.mended.set()

    def close(self) -> None:
        self.cut()
        self.mended.set()
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket, lost: threading.Event | None) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            if lost is None or not lost.is_set():
                sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    source.close()


@pytest.fixture
def cable_to() -> Iterator[list[Cable]]:
    cables: list[Cable] = []
    yield cables
    for cable in cables:
        cable.close()


def test_a_page_whose_connection_dropped_shows_what_it_missed_once(
    start_server: StartServer, browser: BrowserContext, cable_to: list[Cable]
) -> None:
    server = chat_server(start_server, "--history", "50")
    cable = Cable(web_port(server))
    cable_to.append(cable)
    term = join(server)
    tab = open_page(browser, f"http://{HOST}:{cable.port}/")
    term.expect(f"*** {tab.name} joined lobby\n")
    for text in ("one", "two"):
        term.say(text)
        tab.wait_row(f"<{term.name}> {text}")
    tab.say("mine")
    term.expect(f"<{tab.name}> mine\n")
    cable.deaf.set()  # the id of the next line of the page's is lost, with the connection
    tab.say("unheard")
    term.expect(f"<{tab.name}> unheard\n")

    cable.cut()
    term.expect(f"*** {tab.name} left lobby\n")
    tab.wait_status(r"reconnecting in \d+ s")
    term.say("three")
    term.say("/who")  # (once its reply came, "three" was said)
    assert term.line().startswith(b"*** 1 in lobby: ")
    other = join(server, term)
    while other.line() != b"*** end of recent messages\n":
        pass
    other.say("four")
    term.expect(f"<{other.name}> four\n")

    cable.mend()
    tab.wait_status("^connected again$", timeout=RECONNECT_WAIT_MS)
    back = re.findall(WELCOME, "\n".join(tab.rows()), re.MULTILINE)[-1]
    term.expect(f"*** {back} joined lobby\n")
    other.expect(f"*** {back} joined lobby\n")
    tab.wait_row("*** end of missed messages")
    term.say("five")
    tab.wait_row(f"<{term.name}> five")

    rows = tab.rows()
    start = rows.index("*** missed while you were away:")
    missed = rows[start + 1:rows.index("*** end of missed messages")]
    expected = [f"<{term.name}> three", f"*** {other.name} joined lobby",
                f"<{other.name}> four"]
    assert [row[6:] for row in missed] == expected, rows  # (after their time, "HH:MM ")
    assert all(row[:5].encode() in minutes(STARTED) for row in missed), missed
    # Each line once: what it showed before is not shown again, nor its own leave, nor the
    # history (it was given what it missed instead).
    for text in ("one", "two"):
        assert [row for row in rows if row.endswith(f"<{term.name}> {text}")] == [
            f"<{term.name}> {text}"], rows
    for text in ("mine", "unheard"):
        assert [row for row in rows if row.endswith(text)] == [f"<{tab.name}> {text}"], rows
    assert not [row for row in rows if f"{tab.name} left" in row], rows
    assert rows.count("*** recent messages:") == 1, rows  # (the first connection's only)
    assert rows[-1] == f"<{term.name}> five", rows
    assert tab.errors == []


def test_a_page_whose_server_restarted_is_given_what_was_said_elsewhere_meanwhile(
    start_server: StartServer, browser: BrowserContext, redis_server: RedisServer
) -> None:
    """With --redis: the page's instance restarts while another goes on; the instance that comes
    back reads the rooms' shared history, and the page, back on it, in its room, shows what was
    said on the other one meanwhile, once."""
    chat = ("--mode", "chat", "--history", "50")
    first = start_instance(start_server, redis_server, *chat, "--web-port", "0")
    other = start_instance(start_server, redis_server, *chat)
    port = web_port(first)
    term = join(other)
    term.say("/join math")
    term.expect("*** you are now in math\n")
    tab = open_page(browser, f"http://{HOST}:{port}/")
    tab.say("/join math")
    tab.wait_row("*** you are now in math")
    term.expect(f"*** {tab.name} joined math\n")
    term.say("before")
    tab.wait_row(f"<{term.name}> before")

    first.stop()
    term.expect(f"*** {tab.name} left math\n")  # (published as the server closed)
    tab.wait_status(r"reconnecting in \d+ s")
    term.say("while you were away")
    again = start_instance(start_server, redis_server, *chat, "--web-port", str(port))
    again.wait_event("redis.synced")
    tab.wait_status("^connected again$", timeout=RECONNECT_WAIT_MS)
    back = re.findall(WELCOME, "\n".join(tab.rows()), re.MULTILINE)[-1]
    term.expect(f"*** {back} joined math\n")
    tab.wait_row("*** end of missed messages")
    wait_header(tab, "math")
    term.say("live again")
    tab.wait_row(f"<{term.name}> live again")

    rows = tab.rows()
    start = rows.index("*** missed while you were away:")
    missed = rows[start + 1:rows.index("*** end of missed messages")]
    assert [row[6:] for row in missed] == [f"<{term.name}> while you were away"], rows
    assert [row for row in rows if row.endswith(f"<{term.name}> before")] == [
        f"<{term.name}> before"], rows
    assert rows[start - 1] == "*** you are now in math", rows  # seated there at once
    assert rows[-1] == f"<{term.name}> live again", rows
    assert errors_while_away(tab) == []  # (a try may come before the restart is listening)


def test_a_message_over_the_line_limit_is_explained(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server, "--max-line", "64")
    tab = open_page(browser, page_url(server))
    tab.say("x" * 200)
    text = tab.wait_status(r"reconnecting in \d+ s")
    assert "too long" in text, text
    assert tab.page.get_by_label("Message", exact=True).input_value() == "x" * 200
    closed = server.wait_event("connection.closed", reason="message_too_big")
    assert closed["fd"] is not None
    tab.wait_status("^connected again$", timeout=RECONNECT_WAIT_MS)


ONLINE_JS = "() => window.dispatchEvent(new Event('online'))"
"""Back online: the page tries again now rather than at the end of its wait."""


def test_a_full_chat_is_explained_once_and_the_page_tries_again_later(
    start_server: StartServer, browser: BrowserContext
) -> None:
    # The refusal reaches the page in words (no HTTP 503 a script cannot read); the page
    # waits at least 5 s before it tries again, and a second refusal for the same reason is
    # not logged twice. Fails if the words are missing, the page hammers, or repeats itself.
    server = chat_server(start_server, "--max-clients", "1")
    term = join(server)
    tab = open_page(browser, page_url(server), joined=False)
    refusal = "*** the chat is full (1 person); try again later"
    tab.wait_row(refusal)
    waiting = r"^the chat is full \(1 person\); try again later — reconnecting in (\d+) s$"
    first_wait = int(re.findall(waiting, tab.wait_status(waiting))[0])
    assert first_wait >= 4, first_wait  # 5 s, less a quarter of jitter
    tab.page.evaluate(ONLINE_JS)
    tab.wait_status(r"reconnecting in (8|9|1[0-3]) s$")  # the delay doubled: 10 s, jittered
    refusals = itertools.count(1)
    server.wait_for(lambda e: e.get("event") == "connection.rejected" and next(refusals) == 2)
    assert tab.rows().count(refusal) == 1, tab.rows()
    assert "connected again" not in tab.rows(), tab.rows()
    term.sock.close()
    server.wait_closed(term.client)
    tab.page.evaluate(ONLINE_JS)
    tab.wait_match(WELCOME)
    tab.wait_status("^connected again$")
    assert tab.errors == []


def test_a_page_closed_for_idleness_is_told_and_stays_away(
    start_server: StartServer, browser: BrowserContext
) -> None:
    # 1008: trying again would change nothing. Fails if the line is not shown, or if the page
    # reconnects by itself (its first try would come within 1.25 s).
    server = chat_server(start_server, "--idle-timeout", "1")
    tab = open_page(browser, page_url(server))
    tab.wait_row("*** closed: you sent nothing for 1 s")
    text = tab.wait_status("reload the page to come back$")
    assert text.startswith("closed: you sent nothing for 1 s"), text
    tab.page.evaluate(ONLINE_JS)  # not even when the network comes back
    tab.page.wait_for_timeout(2500)
    assert len([e for e in server.events("connection.accepted") if e.get("web")]) == 1
    assert tab.errors == []


# --------------------------------------------------------------------------
# What the page is served with, loads and keeps
# --------------------------------------------------------------------------


def csp_directives(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def test_the_page_has_a_strict_csp_no_cookies_and_loads_only_from_its_server(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    url = page_url(server)
    tab = open_page(browser, url)
    tab.say("hello")
    tab.wait_row(f"<{tab.name}> hello")

    for path in ("", "app.js", "style.css"):
        response = browser.request.get(url + path)
        assert response.ok, (path, response.status)
        headers = response.headers
        assert "set-cookie" not in headers, (path, headers)
        csp = csp_directives(headers.get("content-security-policy", ""))
        assert csp.get("default-src") == ["'self'"], (path, csp)
        for name in ("script-src", "style-src"):
            assert csp.get(name, ["'self'"]) == ["'self'"], (path, csp)
        for name, sources in csp.items():
            for source in sources:
                assert "'unsafe-" not in source and "*" not in source, (path, csp)
                assert source not in ("http:", "https:", "ws:", "wss:"), (path, csp)
                # data: images cannot run anything; data: script, style or frames could.
                assert name == "img-src" or source not in ("data:", "blob:"), (path, csp)

    # The page itself holds no inline script or style (the CSP would refuse them).
    inline = tab.page.evaluate(
        "() => document.querySelectorAll('script:not([src]), style, [style]').length"
    )
    assert inline == 0
    origin = url.rstrip("/")
    others = [u for u in tab.requests if not u.startswith((origin + "/", "ws://" + origin[7:]))]
    assert others == [], others
    assert browser.cookies() == []
    stored = tab.page.evaluate(
        "() => [document.cookie, localStorage.length, sessionStorage.length]"
    )
    assert stored == ["", 0, 0]
    assert tab.errors == []


def test_the_page_logs_no_errors_while_chatting(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    url = page_url(server)
    alice = open_page(browser, url)
    bob = open_page(browser, url)
    alice.say("/me checks the console")
    bob.wait_row(f"* {alice.name} checks the console")
    bob.say("/who")
    bob.wait_match(r"^\*\*\* 2 in lobby: ")
    bob.page.get_by_role("button", name="Send").click()  # an empty box: nothing is sent
    alice.page.reload()
    alice.wait_match(WELCOME)
    assert alice.errors == [] and bob.errors == []


def test_the_page_fits_a_phone_and_follows_the_dark_theme(
    start_server: StartServer, browser: BrowserContext
) -> None:
    server = chat_server(start_server)
    url = page_url(server)
    light = open_page(browser, url, viewport=PHONE)
    dark = open_page(browser, url, viewport=PHONE, scheme="dark")
    long_word = "w" * 300
    light.say(long_word)
    dark.wait_row(f"<{light.name}> {long_word}")

    for tab in (light, dark):
        width = tab.page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], width
        for control in (tab.page.get_by_label("Message", exact=True),
                        tab.page.get_by_role("button", name="Send")):
            box = control.bounding_box()
            assert box is not None
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
            assert box["y"] + box["height"] <= PHONE["height"], box
    assert luminance(dark.page) < 0.2, luminance(dark.page)
    assert luminance(light.page) > 0.8, luminance(light.page)


def luminance(page: Page) -> float:
    """How light the page's background is, 0 (black) to 1 (white)."""
    colour = page.evaluate("() => getComputedStyle(document.documentElement).backgroundColor")
    red, green, blue = (int(c) for c in re.findall(r"\d+", str(colour))[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


# --------------------------------------------------------------------------
# README's screenshot, from a real run
# --------------------------------------------------------------------------

SCREEN = {"width": 680, "height": 560}
PHONE_SCREEN = {"width": 360, "height": 560}


def test_the_screenshot_command_writes_a_png(tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.fail("no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
    out = tmp_path / "chat.png"
    make_screenshot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def make_screenshot(out: Path) -> None:
    """Two pages (a laptop in the light theme, a phone in the dark) and an nc user chat, in two
    rooms and in private; the pages and the terminal's screen are put side by side in one PNG."""
    assert CHROMIUM is not None, "no chromium on PATH"
    with tempfile.TemporaryDirectory() as place:
        accounts = Path(place) / "accounts"  # alice is an operator: she sets the topic
        accounts.write_text(f"alice:{make_hash(PASSWORDS['alice'])}:op\n")
        server = ServerProcess(["--port", "0", "--host", HOST, "--mode", "chat",
                                "--web-port", "0", "--history", "20", "--accounts",
                                str(accounts)])
        server.port = int(server.wait_event("server.started")["port"])
        try:
            play(server, Path(place) / "profile", out)
        finally:
            server.close()


def play(server: ServerProcess, profile: Path, out: Path) -> None:
    """Open the pages and the terminal, play the scene, take the pictures."""
    assert CHROMIUM is not None, "no chromium on PATH"
    with chromium(CHROMIUM, profile) as ctx:
        url = page_url(server)
        alice = open_page(ctx, url, viewport=SCREEN)
        alice.say(f"/login alice {PASSWORDS['alice']}")  # shown as /login alice ••••
        alice.wait_row("*** you are now alice")
        bob = open_page(ctx, url, viewport=PHONE_SCREEN, scheme="dark")
        bob.say("/nick bob")
        alice.wait_row(f"*** {bob.name} is now bob")
        screen = TerminalScreen(join(server))
        screen.type_line("/nick carol")
        screen.read("*** you are now carol")
        for tab in (alice, bob):
            tab.wait_row(f"*** {screen.chatter.name} is now carol")
        scene(alice, bob, screen)
        shots = [tab.page.screenshot() for tab in (alice, bob)]
        compose(ctx, out, shots, screen.text())


def scene(alice: ChatPage, bob: ChatPage, screen: TerminalScreen) -> None:
    """The chat in the screenshot: the lobby, then carol and alice in maths, then bob and carol
    in private."""
    def say(who: ChatPage, text: str, seen: str, *others: ChatPage) -> None:
        """``who`` types ``text``: it shows ``seen``, and the terminal and ``others`` read it."""
        who.say(text)
        who.wait_row(seen)
        screen.read(seen)
        for tab in others:
            tab.wait_row(seen)

    say(alice, "hi both! the page works on the classroom wifi",
        "<alice> hi both! the page works on the classroom wifi", bob)
    say(bob, "and on my phone, in the dark", "<bob> and on my phone, in the dark", alice)
    screen.type_line("I'm on nc in a terminal")
    screen.type_line("/join maths")
    screen.read("*** you are now in maths")
    screen.type_line("who's up for fractions?")
    for tab in (alice, bob):
        tab.wait_row("<carol> I'm on nc in a terminal")
        tab.wait_row("*** carol left lobby")
    wait_room(alice, "maths", 1).click()  # alice follows carol, from the room list
    alice.wait_row("*** end of recent messages")
    screen.read("*** alice joined maths")
    bob.wait_row("*** alice left lobby")
    wait_room(alice, "maths", 2)
    alice.say("/topic fractions, then decimals")
    alice.wait_row("*** you set the topic of maths: fractions, then decimals")
    screen.read("*** alice set the topic of maths: fractions, then decimals")
    say(alice, "me! the list on the left took me here",
        "<alice> me! the list on the left took me here")
    screen.type_line("/msg bob coming too?")
    screen.read("-> *bob* coming too?")
    bob.wait_row("*carol* coming too?")
    bob.page.get_by_role("log").get_by_role("button", name="carol").last.click()
    box = bob.page.get_by_label("Message", exact=True)
    box.press_sequentially("in a minute!")
    box.press("Enter")
    bob.wait_row("-> *carol* in a minute!")
    screen.read("*bob* in a minute!")
    screen.type_line("/rooms")
    screen.read_match(r"^\*\*\* 2 rooms: ")


class TerminalScreen:
    """What the nc user's terminal shows: the lines it read, and what was typed (echoed)."""

    def __init__(self, chatter: Chatter) -> None:
        self.chatter = chatter
        self.shown = [welcome(chatter.name).decode().rstrip("\n")]  # join() read it

    def _next(self) -> str:
        line = self.chatter.line().decode().rstrip("\n")
        self.shown.append(line)
        return line

    def read(self, line: str) -> None:
        """Read lines until ``line`` has arrived."""
        while self._next() != line:
            pass

    def read_match(self, pattern: str) -> None:
        while not re.search(pattern, self._next()):
            pass

    def type_line(self, text: str) -> None:
        self.shown.append(text)
        self.chatter.say(text)

    def text(self) -> str:
        return "\n".join(self.shown) + "\n"


def compose(context: BrowserContext, out: Path, shots: list[bytes], terminal: str) -> None:
    """Lay the screenshots and the terminal out in a page of their own and photograph it."""
    def image(png: bytes, caption: str) -> str:
        data = base64.b64encode(png).decode()
        return (f'<figure><img src="data:image/png;base64,{data}" alt="">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    body = "".join([
        image(shots[0], "alice: a laptop, light theme"),
        image(shots[1], "bob: a phone, dark theme"),
        "<figure><pre>$ nc chat.example 8080\n" + html.escape(terminal) + "</pre>"
        "<figcaption>carol: nc in a terminal</figcaption></figure>",
    ])
    style = """body { margin: 0; padding: 16px; background: #e8e8e6; display: flex; gap: 16px;
                      align-items: flex-start; font: 14px system-ui, sans-serif;
                      width: max-content; }
               figure { margin: 0; } figcaption { margin-top: 6px; color: #333; }
               img, pre { display: block; border: 1px solid #999; border-radius: 6px; }
               pre { margin: 0; width: 400px; height: 560px; padding: 10px; overflow: hidden;
                     background: #101010; color: #d8d8d8; font: 13px/1.45 monospace;
                     white-space: pre-wrap; box-sizing: border-box; }"""
    page = context.new_page()
    page.set_content(f"<!doctype html><style>{style}</style>{body}")
    page.locator("body").screenshot(path=str(out))
    page.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Make README's screenshot from a real run.")
    parser.add_argument("--screenshot", type=Path, required=True, metavar="PNG")
    args = parser.parse_args(argv)
    make_screenshot(args.screenshot)
    print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

