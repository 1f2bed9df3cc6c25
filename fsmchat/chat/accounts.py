"""Accounts: reserved names with argon2 password hashes, the file that holds them, and the join
password.

The accounts file (``--accounts FILE``, written by ``fsmchat passwd NAME``) is text, one account a
line::

    # comments and blank lines are allowed
    alice:$argon2id$v=19$m=8192,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo:op
    bob:$argon2id$v=19$m=8192,t=1,p=1$...

``NAME:HASH`` with an optional ``:op`` (an operator: ``/kick``, ``/mute``, ``/topic``). The name is
a chat name (1 to 16 letters, digits, ``-`` or ``_``), unique by its ``skeleton`` (case and
look-alike letters aside); the hash is an argon2 encoded hash, which holds no ``:``. The server
reads the file once, at its start (a change needs a restart).

Rules it keeps:
- A bad file is refused whole, with one line naming its line number: the server never runs with
  half of its accounts.
- Hashes are checked in the select loop, so they must be cheap: ``HASHER``'s parameters (argon2id,
  8 MiB, one pass) take some 3 ms per check on a laptop core; a hash made with costlier ones (by
  another tool) is refused past ``MAX_COST``. Guessing is slowed by ``guard.Throttle``, not by the
  hash's cost: a wrong try makes the next one wait, and that wait is never spent hashing.
- Passwords never leave this module in any other form than a verdict: nothing logs them.
- The join password file (``--password SECRET_FILE``) holds the password itself (one trailing
  newline stripped); it is compared in constant time, and never shown by ``repr``.
"""

from __future__ import annotations

import hmac
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from fsmchat.chat.text import NAME_MAX, is_name, skeleton

HASHER = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1, type=Type.ID)
"""How ``fsmchat passwd`` hashes: argon2id with 8 MiB and one pass, about 3 ms per check. A chat
server checks passwords in its one loop; wrong tries are slowed by the throttle, so a costlier
hash would stall everyone for little gain."""

MAX_COST = 4 * HASHER.memory_cost * HASHER.time_cost
"""Most KiB x passes a hash in the file may cost (four times ``HASHER``'s, some 12 ms a check):
a costlier one would stall the chat at every login."""

OP = "op"

HEADER = "# fsmchat accounts: NAME:HASH[:op], one a line; fsmchat passwd NAME adds or changes one\n"


class AccountsError(Exception):
    """A bad accounts file, or an account that cannot be made: one line for people."""


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    hash: str = ""
    op: bool = False

    def __repr__(self) -> str:
        return f"Account({self.name!r}, op={self.op})"

    def line(self) -> str:
        return f"{self.name}:{self.hash}{':' + OP if self.op else ''}\n"


class Accounts:
    """The accounts of one file, by the skeleton of their names."""

    def __init__(self, accounts: Iterable[Account] = (), path: str = "") -> None:
        self.path = path
        self.by_look: dict[bytes, Account] = {}
        for account in accounts:
            self.by_look[skeleton(account.name.encode())] = account

    def __len__(self) -> int:
        return len(self.by_look)

    def __repr__(self) -> str:
        return f"Accounts({self.path!r}, {len(self)} accounts)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accounts) and self.by_look == other.by_look

    __hash__ = None  # type: ignore[assignment]

    def like(self, name: bytes) -> Account | None:
        """The account whose name looks like ``name`` (the same skeleton), if any."""
        return self.by_look.get(skeleton(name))

    def check(self, account: Account, password: bytes) -> bool:
        """Whether ``password`` is ``account``'s (some 3 ms)."""
        return verify(account.hash, password)


def _is_name(name: str) -> bool:
    return name.isascii() and is_name(name.encode())


def verify(encoded: str, password: bytes) -> bool:
    try:
        return HASHER.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False


def make_hash(password: str) -> str:
    return HASHER.hash(password)


def check_password(password: str) -> None:
    """A password one can type in the chat: ``/nick NAME PASSWORD`` takes the rest of the line,
    blanks at its ends cut, so those and control characters could never be typed back."""
    if not password:
        raise AccountsError("the password is empty")
    if password != password.strip(" "):
        raise AccountsError("the password starts or ends with a space, which the chat cuts")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in password):
        raise AccountsError("the password holds a control character, which cannot be typed "
                            "in the chat")


# -- the file ---------------------------------------------------------------------------------


def parse_line(text: str, number: int) -> Account | None:
    """One line of the file: an account, or None for a blank line or a comment."""
    line = text.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    parts = line.split(":")
    if len(parts) not in (2, 3):
        raise AccountsError(f"line {number}: expected NAME:HASH or NAME:HASH:op")
    name, encoded = parts[0], parts[1]
    if not _is_name(name):
        raise AccountsError(f"line {number}: {name!r} is not a name: use 1 to {NAME_MAX} "
                            "letters, digits, - or _")
    if len(parts) == 3 and parts[2] != OP:
        raise AccountsError(f"line {number}: {name}: expected {OP!r} after the hash, not "
                            f"{parts[2]!r}")
    try:
        parameters = extract_parameters(encoded)
    except InvalidHashError:
        raise AccountsError(f"line {number}: {name}: not an argon2 hash (make one with "
                            f"fsmchat passwd {name})") from None
    cost = parameters.memory_cost * parameters.time_cost
    if cost > MAX_COST:
        raise AccountsError(
            f"line {number}: {name}: the hash costs too much to check in the chat's loop "
            f"(m={parameters.memory_cost},t={parameters.time_cost}: more than {MAX_COST} KiB "
            f"x passes); make it again with fsmchat passwd {name}")
    return Account(name, encoded, len(parts) == 3)


def parse(text: str, path: str = "") -> Accounts:
    """The accounts of a file's text; AccountsError naming the first bad line."""
    seen: dict[bytes, tuple[str, int]] = {}
    accounts: list[Account] = []
    for number, line in enumerate(text.splitlines(), 1):
        account = parse_line(line, number)
        if account is None:
            continue
        look = skeleton(account.name.encode())
        if look in seen:
            other, where = seen[look]
            same = "is" if other.lower() == account.name.lower() else "looks too much like"
            raise AccountsError(f"line {number}: {account.name} {same} {other} (line {where})")
        seen[look] = account.name, number
        accounts.append(account)
    return Accounts(accounts, path)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        raise AccountsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AccountsError(f"{path}: not UTF-8 text") from None


def load(path: str) -> Accounts:
    """The accounts in the file at ``path``; AccountsError (the path and the line) if bad."""
    text = read_text(path)
    try:
        return parse(text, path)
    except AccountsError as exc:
        raise AccountsError(f"{path}: {exc}") from None


def set_account(path: str, name: str, password: str, op: bool | None) -> bool:
    """Add ``name`` to the file at ``path`` or change its password (``op``: mark it an operator,
    or not; None: as it was, not for a new one); whether it was new. The file is rewritten
    whole through a temporary file and a rename, so a reader sees the old file or the new one;
    a new file is made with mode 0600 (others cannot read the hashes), an old one keeps its."""
    if not _is_name(name):
        raise AccountsError(f"{name!r} is not a name: use 1 to {NAME_MAX} letters, digits, - or _")
    check_password(password)
    target = Path(path)
    exists = target.exists()
    lines = read_text(path).splitlines(keepends=True) if exists else [HEADER]
    try:
        parse("".join(lines), path)
    except AccountsError as exc:
        raise AccountsError(f"{path}: {exc}") from None
    look = skeleton(name.encode())
    new = True
    for index, text in enumerate(lines):
        account = parse_line(text, index + 1)
        if account is None or skeleton(account.name.encode()) != look:
            continue
        if account.name != name:
            raise AccountsError(f"{name} looks too much like {account.name}, who has an "
                                f"account (line {index + 1})")
        lines[index] = Account(name, make_hash(password),
                               account.op if op is None else op).line()
        new = False
    if new:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(Account(name, make_hash(password), bool(op)).line())
    _write(target, "".join(lines), None if not exists else target.stat().st_mode & 0o7777)
    return new


def _write(target: Path, text: str, mode: int | None) -> None:
    """``text`` into ``target`` at once: a temporary file beside it, synced, then renamed."""
    folder = target.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)  # mode 0600
    except OSError as exc:
        raise AccountsError(f"cannot write in {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            if mode is not None:
                os.fchmod(file.fileno(), mode)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise AccountsError(f"cannot write {target}: {exc.strerror or exc}") from None


# -- the join password -----------------------------------------------------------------------


class JoinPassword:
    """The shared password everyone gives before joining (``--password SECRET_FILE``)."""

    __slots__ = ("path", "_secret")

    def __init__(self, secret: bytes, path: str = "") -> None:
        self.path = path
        self._secret = secret

    def __repr__(self) -> str:
        return f"JoinPassword({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JoinPassword) and hmac.compare_digest(self._secret,
                                                                       other._secret)

    __hash__ = None  # type: ignore[assignment]

    def matches(self, password: bytes) -> bool:
        return hmac.compare_digest(self._secret, password)


def load_join_password(path: str) -> JoinPassword:
    """The password in the file at ``path`` (its first line; one trailing newline stripped)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise AccountsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    if b"\n" in data:
        raise AccountsError(f"{path}: the password must be one line")
    try:
        check_password(data.decode())
    except UnicodeDecodeError:
        raise AccountsError(f"{path}: the password is not UTF-8") from None
    except AccountsError as exc:
        raise AccountsError(f"{path}: {exc}") from None
    return JoinPassword(data, path)
