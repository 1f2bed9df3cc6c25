"""Each model's two ways to fire a trigger agree, and both follow its lifecycle table.

``Connection.fire`` is the table compiled (``machine.TableModel``): one lookup, the state set,
the action run; the shared ``transitions`` machine's own ``Event.trigger`` is the reference.
Fed the same triggers, both must reach the same states through the same actions, and refuse
the same triggers.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Protocol

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transitions import MachineError

from fsmchat import lifecycle
from fsmchat.connection import MACHINE, Connection
from fsmchat.hub import Hub
from fsmchat.lifecycle import InvalidTrigger, LinkState, LinkTrigger, State, Trigger
from fsmchat.machine import TableMachine, TableModel
from fsmchat.net.http import HttpConnection
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.options import Options
from fsmchat.redis.bus import PublishLink
from fsmchat.redis.link import RedisAddress, RedisLink
from fsmchat.server import Server


def hub() -> Hub:
    """A real server's hub around the connection; its listener is never accepted from."""
    listener = socket.create_server(("127.0.0.1", 0))
    return Server(Options(host=None, port=0), [(listener, None)],
                  make_logger(LogStream.memory(io.BytesIO()), "debug", "json"),
                  loop=EventLoop()).hub


class Recording(Connection):
    """A connection whose actions (every one the table names) only say that they ran."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "test", hub())
        self.ran: list[str] = []


def _recorder(name: str) -> Callable[[Recording], None]:
    def action(self: Recording) -> None:
        self.ran.append(name)

    return action


for _row in lifecycle.TRANSITIONS:
    if _row.action:
        setattr(Recording, _row.action, _recorder(_row.action))


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_the_machine_is_built_from_the_table() -> None:
    for state in State:
        for trigger in Trigger:
            event = MACHINE.events[trigger.value]
            rows = event.transitions.get(state.value, [])
            if not lifecycle.allowed(state, trigger):
                assert rows == []
                continue
            row = lifecycle.row_for(state, trigger)
            assert len(rows) == 1
            assert rows[0].dest == row.dest
            assert rows[0].after == ([row.action] if row.action else [])
    assert MACHINE.initial == lifecycle.INITIAL.value


class Recorder(Protocol):
    ran: list[str]
    state: str
    machine: ClassVar[TableMachine]

    def fire(self, trigger: str) -> None: ...


def assert_same_path(fast: Recorder, reference: Recorder, triggers: Sequence[str]) -> None:
    """Feed ``fast`` through ``fire`` and ``reference`` through the machine: same states, same
    actions, the same triggers refused."""
    for trigger in triggers:
        try:
            fast.fire(trigger)
            fast_refused = False
        except InvalidTrigger:
            fast_refused = True
        try:
            reference.machine.events[str(trigger)].trigger(reference)
            reference_refused = False
        except MachineError:
            reference_refused = True
        assert fast_refused == reference_refused
        assert fast.state == reference.state
        assert fast.ran == reference.ran


@given(st.lists(st.sampled_from(list(Trigger)), max_size=30))
def test_fire_and_the_machine_agree(triggers: list[Trigger]) -> None:
    a, b = socket.socketpair()
    fast, reference = Recording(a), Recording(b)
    try:
        assert_same_path(fast, reference, triggers)
    finally:
        for conn in (fast, reference):
            MACHINE.remove_model(conn)
        a.close()
        b.close()


def test_an_unknown_pair_is_refused_and_the_state_kept(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    conn = Recording(sockets[0])
    with pytest.raises(InvalidTrigger):
        conn.fire(Trigger.READABLE)  # still `accepted`: not yet in the loop
    assert conn.state == State.ACCEPTED
    assert conn.ran == []
    MACHINE.remove_model(conn)


# -- the Redis link: the same two paths, on its own table ----------------------------------------


class RecordingLink(PublishLink):
    """A publish link whose actions only say that they ran (no socket is ever opened)."""

    def __init__(self) -> None:
        super().__init__(RedisAddress("127.0.0.1"), EventLoop(),
                         make_logger(LogStream.memory(io.BytesIO()), "debug", "json"),
                         channel=b"test", origin=b"0" * 16, outbox_limit=1 << 20)
        self.ran: list[str] = []


for _row in lifecycle.LINK_TRANSITIONS:
    if _row.action:
        setattr(RecordingLink, _row.action, _recorder(_row.action))


@pytest.mark.parametrize("model", [RedisLink, HttpConnection], ids=lambda m: m.__name__)
def test_the_link_and_http_machines_are_built_from_their_tables(
        model: type[TableModel]) -> None:
    machine, table = model.machine, model.lifecycle
    triggers = {str(row.trigger) for row in table.transitions}
    for state in table.states:
        for trigger in triggers:
            rows = machine.events[trigger].transitions.get(str(state), [])
            if not table.allowed(state, trigger):
                assert rows == []
                continue
            row = table.row_for(state, trigger)
            assert len(rows) == 1
            assert rows[0].dest == row.dest
            assert rows[0].after == ([row.action] if row.action else [])
    assert machine.initial == table.initial


@given(st.lists(st.sampled_from(list(LinkTrigger)), max_size=30))
def test_link_fire_and_the_machine_agree(triggers: list[LinkTrigger]) -> None:
    fast, reference = RecordingLink(), RecordingLink()
    try:
        assert_same_path(fast, reference, triggers)
    finally:
        for link in (fast, reference):
            RedisLink.machine.remove_model(link)


def test_a_model_may_not_name_an_attribute_like_a_trigger() -> None:
    """The machine would silently replace it with its trigger function (model_override)."""
    with pytest.raises(TypeError, match="fail"):
        type("Clashing", (RedisLink,), {"fail": lambda self: None})


def test_the_machine_keeps_its_models_in_order_and_each_once() -> None:
    machine = RedisLink.machine
    links = [RecordingLink() for _ in range(3)]  # each adds itself
    try:
        assert all(link in machine.models for link in links)
        assert all(link.state == LinkState.IDLE for link in links)
        machine.add_model(links[0])  # again: nothing changes
        machine.remove_model(links[1])
        assert links[1] not in machine.models
        assert [m for m in machine.models if m in links] == [links[0], links[2]]
        with pytest.raises(ValueError, match="not a model"):
            machine.remove_model(links[1])
    finally:
        for link in (links[0], links[2]):
            machine.remove_model(link)


@pytest.mark.parametrize("name", ["is_ready", "may_dial", "on_enter_backoff", "trigger"])
def test_a_model_may_not_name_what_the_machine_binds(name: str) -> None:
    """``add_model`` binds nothing, which holds only while no model declares these."""
    with pytest.raises(TypeError, match=name):
        type("Clashing", (RedisLink,), {name: lambda self: None})
