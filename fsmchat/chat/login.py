"""Accounts in the chat: reserved names, ``/login NAME PASSWORD`` and ``/nick NAME PASSWORD``.

With ``--accounts``, the name of every account (and every name that looks like one: the same
``skeleton``) is kept for whoever gives its password; ``/nick`` refuses it to anyone else, and no
newcomer is given one. Logging in takes the account's name and, for an account marked ``op``,
makes the member an operator; both last as long as the connection (a later ``/nick`` to another
name keeps them, and ``/nick`` back needs no password).

Rules it keeps:
- A try for a name (``/login`` or ``/nick`` with a password) is first asked of the throttle,
  for the address it comes from and for the name: while either must wait, it is refused before
  any hash is checked (``*** too many tries for alice; wait N s``), whatever the password. A
  wrong password makes both wait longer; a right one forgives the name. One connection gets
  one check a second at most, right or wrong (``CHECK_SPACING``): hashing is the loop's time.
- A refusal changes nothing: the name, the login and the operator flag stay as they were.
- Passwords are never logged, never echoed, never part of a notice: events name the account and
  the peer only.
- An account's name held by another connection of the same account (a session left open
  elsewhere) passes to the one that logged in last; the other is given a fresh name and is no
  longer logged in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsmchat.access import address_key
from fsmchat.chat.accounts import Account, Accounts
from fsmchat.chat.commands import Call, Handler
from fsmchat.chat.guard import Throttle, seconds
from fsmchat.chat.text import clean, is_name, skeleton
from fsmchat.hub import Extension

CHECK_SPACING = 1.0
"""Seconds between two password checks of one connection, right or wrong: a check costs some
3 ms of the loop, so a read full of logins cannot stall the chat (wrong ones wait longer)."""

if TYPE_CHECKING:
    from fsmchat.chat.mode import Chat, Member
    from fsmchat.connection import Connection as Client


def peer_address(peer: str) -> str:
    """What a client at ``peer`` ("host:port", "[v6]:port") counts under (``address_key``)."""
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return address_key(host)


class Login(Extension):
    """Who is logged in as which account, and the commands that log in."""

    def __init__(self, chat: Chat, accounts: Accounts, throttle: Throttle | None = None) -> None:
        self.chat = chat
        self.hub = chat.hub
        self.accounts = accounts
        self.throttle = throttle or Throttle()
        self.logged_in: dict[int, Account] = {}  # fd -> the account it gave the password of
        self.checked: dict[int, float] = {}  # fd -> when a password of its was last checked
        chat.reserved = accounts.by_look
        chat.losing = self._lost

    def account_of(self, client: Client) -> Account | None:
        return self.logged_in.get(client.fd)

    def _lost(self, member: Member) -> None:
        """``member`` lost its account's name to another instance (it logged in there
        first): as a connection that loses its account's name here, it is logged in no more."""
        account = self.logged_in.get(member.client.fd)
        if account is not None and skeleton(account.name.encode()) == skeleton(member.name):
            del self.logged_in[member.client.fd]
            member.operator = False

    def left(self, client: Client) -> None:
        self.logged_in.pop(client.fd, None)
        self.checked.pop(client.fd, None)

    # -- the commands ---------------------------------------------------------------------------

    def nick(self, plain: Handler) -> Handler:
        """``/nick`` with accounts: ``/nick NAME PASSWORD`` logs in; a reserved ``NAME`` alone is
        refused unless it is the caller's own account's; any other goes to ``plain``."""
        def nick(call: Call) -> bool:
            name, _, password = call.argument.partition(b" ")
            password = password.strip(b" ")
            if password:
                if not is_name(name):
                    call.answer(b'nick: "%s" is not a name' % clean(name))
                    return False
                return self._claim(call, name, password, b"nick")
            account = self.accounts.like(name) if is_name(name) else None
            if account is not None and self.logged_in.get(call.client.fd) is not account:
                if account.name.encode().lower() == name.lower():
                    call.answer(b"nick: %s is reserved; /nick %s PASSWORD if it is yours"
                                % (account.name.encode(), account.name.encode()))
                else:
                    call.answer(b"nick: %s looks too much like %s, a reserved name"
                                % (name, account.name.encode()))
                return False
            return plain(call)

        return nick

    def login(self, call: Call) -> bool:
        """``/login NAME PASSWORD``."""
        name, _, password = call.argument.partition(b" ")
        password = password.strip(b" ")
        if not name or not password:
            call.usage()
            return False
        if not is_name(name):
            call.answer(b'login: "%s" is not a name' % clean(name))
            return False
        return self._claim(call, name, password, b"login")

    def _claim(self, call: Call, name: bytes, password: bytes, verb: bytes) -> bool:
        """Log in as the account ``name`` looks like, with ``password``, and take its name."""
        client, member = call.client, call.member
        account = self.accounts.like(name)
        if account is None:
            call.answer(b"%s: %s has no account" % (verb, name))
            return False
        shown = account.name.encode()
        keys = (("name", skeleton(shown)), ("address", peer_address(client.peer)))
        throttle = self.throttle
        now = throttle.clock()
        last = self.checked.get(client.fd)
        wait = max(throttle.wait(*keys), 0.0 if last is None else last + CHECK_SPACING - now)
        if wait:
            call.answer(b"too many tries for %s; wait %d s" % (shown, seconds(wait)))
            return False
        self.checked[client.fd] = now
        if not self.accounts.check(account, password):
            wait = throttle.failed(*keys)
            self.hub.log.warning("chat.login_failed", fd=client.fd, peer=client.peer,
                                 name=account.name, wait=round(wait, 3))
            call.answer(b"wrong password for %s (next try in %d s)" % (shown, seconds(wait)))
            return False
        throttle.forgive(keys[0])
        self.logged_in[client.fd] = account
        member.operator = account.op
        self.hub.log.info("chat.login", fd=client.fd, peer=client.peer, name=account.name,
                          op=account.op)
        call.answer(b"logged in as %s%s" % (shown, b", an operator" if account.op else b""))
        if member.name == shown:
            return False
        self._free(shown, client)
        self.chat.rename(client, member, shown)
        return True

    def _free(self, name: bytes, client: Client) -> None:
        """The account's name, if another connection holds it (logged in as the same account),
        passes to ``client``: that one gets a fresh name and is logged in no more."""
        chat = self.chat
        other = chat.directory.find(name)
        if other is None or other.client is client:
            return
        self.logged_in.pop(other.client.fd, None)
        other.operator = False
        self.hub.tell(other.client, b"*** %s logged in from another connection\n" % name)
        chat.rename(other.client, other, chat._new_name())  # (a name nobody holds)
