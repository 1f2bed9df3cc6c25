"""--history-file: a standalone server's history survives a restart, a crash's torn write, and
is bounded on disk. Real server processes, real files; the file's own rules are
test_history_file.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

from chat_harness import join
from conftest import (
    ServerProcess,
    StartServer,
    recv_exactly,
    run_cli,
    send_messages,
)

from fsmchat.connection import RECV_SIZE
from fsmchat.history_file import COMPACT_FLOOR

CHAT = ("--mode", "chat")


def chat_with_file(start_server: StartServer, path: Path, *extra: str) -> ServerProcess:
    server = start_server(*CHAT, "--history", "20", "--history-file", str(path), *extra)
    server.wait_event("history.loaded")
    return server


def test_a_restart_keeps_chat_history_in_every_room(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "history"
    server = chat_with_file(start_server, path)
    alice = join(server)
    alice.say("before the restart")
    alice.say("/join math")
    alice.expect("*** you are now in math\n")
    alice.say("x = 2")
    alice.say("/quit")
    server.wait_event("connection.closed")
    assert server.stop() == 0

    again = chat_with_file(start_server, path)
    assert again.events("history.loaded")[0]["records"] > 0
    bob = join(again)
    bob.expect_replay(f"*** {alice.name} joined lobby\n", f"<{alice.name}> before the restart\n",
                      f"*** {alice.name} left lobby\n")
    bob.say("/join math")
    bob.expect("*** you are now in math\n")
    bob.expect_replay(f"*** {alice.name} joined math\n", f"<{alice.name}> x = 2\n",
                      f"*** {alice.name} left math\n")


def test_a_restart_keeps_raw_history(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "history"
    server = start_server("--history", "5", "--history-file", str(path))
    sender = server.connect()
    messages = [b"first\x00\xff", b"second\n", b"third"]
    send_messages(server, sender, messages)
    assert server.stop() == 0

    again = start_server("--history", "5", "--history-file", str(path))
    newcomer = again.connect()
    assert recv_exactly(newcomer.sock, sum(map(len, messages))) == b"".join(messages)


def test_a_torn_last_record_is_skipped_and_the_rest_kept(start_server: StartServer,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "history"
    server = chat_with_file(start_server, path)
    alice = join(server)
    alice.say("kept line")
    server.wait_received_from(alice.client, len(b"kept line\n"))  # (two records, not one)
    alice.say("torn line")
    alice.say("/quit")
    server.wait_event("connection.closed")
    assert server.stop() == 0
    content = path.read_bytes()
    torn = content.rindex(b"torn line")  # the last records: "torn line", then the leave
    path.write_bytes(content[:torn + 4])  # a crash in the middle of that write

    again = chat_with_file(start_server, path)
    skipped = again.wait_event("history.skipped")
    assert skipped["bytes"] == torn + 4 - content.rindex(b"\nr ", 0, torn) - 1
    bob = join(again)
    bob.expect_replay(f"*** {alice.name} joined lobby\n", f"<{alice.name}> kept line\n")
    bob.say("said after the crash")
    bob.say("/quit")
    again.wait_event("connection.closed")
    assert again.stop() == 0

    third = chat_with_file(start_server, path)
    assert not third.events("history.skipped"), "the torn tail was cut before the next write"
    carol = join(third)
    carol.expect_replay(f"*** {alice.name} joined lobby\n", f"<{alice.name}> kept line\n",
                        f"*** {bob.name} joined lobby\n", f"<{bob.name}> said after the crash\n",
                        f"*** {bob.name} left lobby\n")


def test_a_file_that_is_not_ours_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"my shopping list\nmilk\n")
    result = run_cli(*CHAT, "--port", "0", "--history", "5", "--history-file", str(path))
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert path.read_bytes() == b"my shopping list\nmilk\n", "left as it was"


def test_the_file_stays_bounded_and_holds_no_content_in_the_log(start_server: StartServer,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "history"
    limit = 16 * 1024
    server = chat_with_file(start_server, path, "--history-bytes", str(limit))
    alice = join(server)
    secret = "confidential-%d-" + "x" * 200
    count = 2000
    for i in range(count):
        alice.say(secret % i)
    alice.say("/quit")
    server.wait_event("connection.closed")
    assert server.stop() == 0
    rewrites = server.events("history.rewritten")
    assert rewrites, "the file was rewritten as it grew"
    # Bounded by the history's bytes, not by what was said: a rewrite comes once the file is
    # past twice what is live, twice the last rewrite, or COMPACT_FLOOR, so at any time it holds
    # at most that and what the turns since the last check appended (a few reads' lines, each
    # record framed: up to about 150 KiB here). Where the last rewrite fell depends on how the
    # lines were batched into reads, so any size under that constant is right.
    said = count * len(secret % count)
    bound = COMPACT_FLOOR + 4 * RECV_SIZE
    assert bound < said
    for size in [os.path.getsize(path)] + [e["before"] for e in rewrites]:
        assert size <= bound, (size, bound, [(e["before"], e["bytes"]) for e in rewrites])
    assert not any("confidential" in line for line in server.lines())

    again = chat_with_file(start_server, path, "--history-bytes", str(limit))
    bob = join(again)
    first = bob.line()
    assert first == b"*** recent messages:\n"
    replayed = []
    while (line := bob.line()) != b"*** end of recent messages\n":
        replayed.append(line)
    assert replayed[-1].endswith(f"*** {alice.name} left lobby\n".encode())
    assert replayed[-2].endswith(f"<{alice.name}> {secret % (count - 1)}\n".encode())
    assert sum(len(line) - 6 for line in replayed) <= limit  # (each after its "HH:MM ")
