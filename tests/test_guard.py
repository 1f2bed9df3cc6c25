"""The parts of accounts that need no server: the throttle's arithmetic on a clock the test
turns, and the accounts file (what it accepts, what it refuses, with which line number).

The server-side behaviour (refusals as people see them) is in ``test_accounts.py``.
"""

from __future__ import annotations

import pytest
from argon2 import extract_parameters

from fsmchat.chat import accounts
from fsmchat.chat.accounts import Account, AccountsError, make_hash, parse, verify
from fsmchat.chat.guard import Throttle, seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the throttle --------------------------------------------------------------------------


def test_each_wrong_try_doubles_the_wait_up_to_the_cap() -> None:
    clock = Clock()
    throttle = Throttle(base=1.0, cap=8.0, clock=clock)
    waits = []
    for _ in range(6):
        assert throttle.wait("alice") == 0
        waits.append(throttle.failed("alice"))
        clock.now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_try_during_the_wait_is_refused_and_does_not_count() -> None:
    clock = Clock()
    throttle = Throttle(base=2.0, clock=clock)
    throttle.failed("alice")
    clock.now += 0.5
    assert throttle.wait("alice") == pytest.approx(1.5)
    clock.now += 1.5
    assert throttle.wait("alice") == 0
    assert throttle.failed("alice") == 4.0  # the second wrong try, not the third


def test_the_longest_wait_of_the_keys_holds() -> None:
    clock = Clock()
    throttle = Throttle(base=1.0, clock=clock)
    for _ in range(3):
        throttle.failed("address")
        clock.now += 10
    throttle.failed("address", "bob")  # the address's fourth, bob's first
    assert throttle.wait("bob") == 1.0
    assert throttle.wait("carol") == 0
    assert throttle.wait("carol", "address") == 8.0


def test_forgiving_a_name_leaves_the_address_counted() -> None:
    clock = Clock()
    throttle = Throttle(base=1.0, clock=clock)
    throttle.failed("name", "address")
    throttle.forgive("name")
    assert throttle.wait("name") == 0
    assert throttle.wait("address") == 1.0


def test_a_key_quiet_long_enough_starts_over() -> None:
    clock = Clock()
    throttle = Throttle(base=1.0, forget=60.0, clock=clock)
    for _ in range(4):
        throttle.failed("alice")
    clock.now += 8 + 59
    assert throttle.failed("alice") == 16.0  # not yet forgotten
    clock.now += 16 + 60
    assert throttle.wait("alice") == 0
    assert len(throttle) == 0  # and dropped
    assert throttle.failed("alice") == 1.0


def test_memory_is_bounded_the_least_recently_failed_go_first() -> None:
    clock = Clock()
    throttle = Throttle(max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        throttle.failed(key)
    throttle.failed("a")  # a is the most recent now
    throttle.failed("d")
    assert len(throttle) == 3
    assert throttle.wait("b") == 0  # gone
    assert throttle.wait("a") > 0 and throttle.wait("c") > 0 and throttle.wait("d") > 0


def test_waits_are_told_in_whole_seconds_rounded_up() -> None:
    assert [seconds(w) for w in (0.01, 0.999, 1.0, 1.001, 59.5)] == [1, 1, 1, 2, 60]


# --- hashes and the file -----------------------------------------------------------------


def test_a_hash_checks_its_password_only() -> None:
    encoded = make_hash("correct horse")
    assert encoded.startswith("$argon2id$")
    assert verify(encoded, b"correct horse")
    assert not verify(encoded, b"correct horsE")
    assert not verify("$argon2id$garbage", b"correct horse")


def test_the_file_gives_names_hashes_and_operators_and_skips_comments() -> None:
    alice, bob = make_hash("a"), make_hash("b")
    book = parse(f"# accounts\n\nalice:{alice}:op\n  # indented comment\nBob:{bob}\n")
    assert len(book) == 2
    found = book.like(b"ALICE")
    assert found == Account("alice", alice, op=True)
    assert book.like(b"b0b") == Account("Bob", bob, op=False)  # look-alikes find it too
    assert book.like(b"carol") is None
    assert book.check(found, b"a") and not book.check(found, b"b")


@pytest.mark.parametrize(("text", "message"), [
    ("alice\n", "line 2: expected NAME:HASH or NAME:HASH:op"),
    ("al ice:{h}\n", "line 2: 'al ice' is not a name"),
    ("alice:{h}:admin\n", "line 2: alice: expected 'op' after the hash, not 'admin'"),
    ("alice:{h}:op:x\n", "line 2: expected NAME:HASH or NAME:HASH:op"),
    ("alice:plaintext\n", "line 2: alice: not an argon2 hash"),
    ("alice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA\n",
     "line 2: alice: the hash costs too much to check in the chat's loop"),
    ("bob:{h}\nALICE:{h}\n", "line 3: ALICE is alice (line 1)"),
    ("bob:{h}\naIice:{h}\n", "line 3: aIice looks too much like alice (line 1)"),
])
def test_a_bad_line_is_refused_with_its_number(text: str, message: str) -> None:
    encoded = make_hash("x")
    first = "alice:{h}\n" if "ALICE" in text or "aIice" in text else "# first\n"
    with pytest.raises(AccountsError) as caught:
        parse((first + text).format(h=encoded))
    assert str(caught.value).startswith(message), caught.value


def test_the_hashes_are_cheap_enough_for_the_loop() -> None:
    """The parameters ``fsmchat passwd`` uses, within the cap the file allows."""
    parameters = extract_parameters(make_hash("x"))
    assert parameters.type.name == "ID"
    assert parameters.memory_cost * parameters.time_cost * 4 == accounts.MAX_COST


def test_a_password_must_be_typeable_in_the_chat() -> None:
    for bad in ("", " lead", "trail ", "tab\there", "del\x7f"):
        with pytest.raises(AccountsError):
            accounts.check_password(bad)
    accounts.check_password("spaces inside are fine")
