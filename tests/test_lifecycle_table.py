"""The lifecycles as data (``fsmchat.lifecycle``): pure, no sockets."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsmchat.lifecycle import (
    INITIAL,
    LIFECYCLES,
    LINK_TRANSITIONS,
    REDIS_LINK,
    TRANSITIONS,
    InvalidTrigger,
    Lifecycle,
    LinkState,
    LinkTrigger,
    State,
    Transition,
    Trigger,
    next_state,
)


def allowed(state: State) -> list[Trigger]:
    """Triggers accepted in ``state``, found through the public function."""
    result = []
    for trigger in Trigger:
        try:
            next_state(state, trigger)
        except InvalidTrigger:
            continue
        result.append(trigger)
    return result


def reachable(start: State) -> set[State]:
    seen = {start}
    todo = deque([start])
    while todo:
        state = todo.popleft()
        for trigger in allowed(state):
            nxt = State(next_state(state, trigger))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def table_pairs(transitions: Iterable[Transition]) -> list[tuple[str, str]]:
    return [(source, t.trigger) for t in transitions for source in t.sources]


def test_states_and_triggers_have_the_documented_values() -> None:
    assert {s.name: s.value for s in State} == {
        "ACCEPTED": "accepted",
        "HANDSHAKING": "handshaking",
        "READING": "reading",
        "PAUSED": "paused",
        "LIMITED": "limited",
        "EMPTIED": "emptied",
        "DRAINING": "draining",
        "CLOSING": "closing",
        "CLOSED": "closed",
    }
    assert {t.name: t.value for t in Trigger} == {
        "START": "start",
        "SECURE": "secure",
        "UPGRADE": "upgrade",
        "ESTABLISHED": "established",
        "READABLE": "readable",
        "WRITABLE": "writable",
        "HANGUP": "hangup",
        "REFUSE": "refuse",
        "QUIT": "quit",
        "DISMISS": "dismiss",
        "THROTTLE": "throttle",
        "RESUME": "resume",
        "OVERRUN": "overrun",
        "CREDIT": "credit",
        "EMPTY": "empty",
        "SHUTDOWN": "shutdown",
        "DRAINED": "drained",
        "FAIL": "fail",
        "RELEASE": "release",
    }
    assert isinstance(State.READING, str) and str(State.READING) == "reading"
    assert INITIAL is State.ACCEPTED


def test_transitions_are_frozen_dataclasses_with_the_documented_fields() -> None:
    assert isinstance(TRANSITIONS, tuple) and TRANSITIONS
    assert [f.name for f in dataclasses.fields(Transition)] == [
        "trigger",
        "sources",
        "dest",
        "action",
        "doc",
    ]
    for t in TRANSITIONS:
        assert isinstance(t, Transition)
        assert isinstance(t.trigger, Trigger)
        assert isinstance(t.sources, tuple) and t.sources
        assert all(isinstance(s, State) for s in t.sources)
        assert t.dest is None or isinstance(t.dest, State)
        assert t.action is None or (isinstance(t.action, str) and t.action)
        assert isinstance(t.doc, str) and t.doc.strip()
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRANSITIONS[0].doc = "changed"  # type: ignore[misc]


def test_table_is_deterministic() -> None:
    pairs = table_pairs(TRANSITIONS)
    duplicates = {p for p in pairs if pairs.count(p) > 1}
    assert not duplicates, f"(state, trigger) pairs with several transitions: {duplicates}"


def test_next_state_follows_the_table() -> None:
    for t in TRANSITIONS:
        for source in t.sources:
            expected = source if t.dest is None else t.dest
            assert next_state(source, t.trigger) == expected, (source, t)


def test_pairs_not_in_the_table_raise_invalid_trigger() -> None:
    listed = set(table_pairs(TRANSITIONS))
    unlisted = [(s, t) for s in State for t in Trigger if (s, t) not in listed]
    assert unlisted, "every trigger allowed in every state is not a lifecycle"
    for state, trigger in unlisted:
        with pytest.raises(InvalidTrigger):
            next_state(state, trigger)


def test_invalid_trigger_is_an_exception() -> None:
    assert issubclass(InvalidTrigger, Exception)


def test_every_state_is_reachable_from_initial() -> None:
    assert reachable(INITIAL) == set(State)


def test_closed_is_reachable_from_every_state() -> None:
    for state in State:
        assert State.CLOSED in reachable(state), state


def test_closed_is_terminal() -> None:
    assert [t for t in TRANSITIONS if State.CLOSED in t.sources] == []
    assert allowed(State.CLOSED) == []


def test_every_trigger_is_used() -> None:
    assert {t.trigger for t in TRANSITIONS} == set(Trigger)


def test_lifecycle_starts_by_reading() -> None:
    assert next_state(INITIAL, Trigger.START) == State.READING


@given(st.data())
def test_any_allowed_trigger_sequence_stays_in_the_lifecycle(data: st.DataObject) -> None:
    state = INITIAL
    steps = data.draw(st.integers(min_value=0, max_value=40), label="steps")
    for _ in range(steps):
        options = allowed(state)
        if not options:
            break
        trigger = data.draw(st.sampled_from(options), label=f"trigger in {state}")
        nxt = next_state(state, trigger)
        assert isinstance(nxt, State)
        state = nxt
        assert State.CLOSED in reachable(state), f"stuck in {state}: no path to closed"
    if not allowed(state):
        assert state == State.CLOSED, f"dead end in {state}"


@given(st.sampled_from(list(State)), st.sampled_from(list(Trigger)))
def test_next_state_either_returns_a_state_or_raises_invalid_trigger(
    state: State, trigger: Trigger
) -> None:
    listed = (state, trigger) in set(table_pairs(TRANSITIONS))
    try:
        result = next_state(state, trigger)
    except InvalidTrigger:
        assert not listed
    else:
        assert listed
        assert isinstance(result, State)


@pytest.mark.parametrize("table", LIFECYCLES, ids=lambda t: t.name)
def test_every_lifecycle_is_closed_off_and_reaches_its_end(table: Lifecycle) -> None:
    """In every table: the final state is terminal and every other state can reach it."""
    edges: dict[str, set[str]] = {state: set() for state in table.states}
    for row in table.transitions:
        assert row.action is None or row.action != row.trigger, row
        for source in row.sources:
            assert source in edges and (row.dest is None or row.dest in edges), row
            edges[source].add(row.dest or source)
    assert edges[table.final] == set()
    for state in table.states:
        seen, todo = {state}, [state]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert table.final in seen, f"{table.name}: {state} cannot reach {table.final}"


def test_the_link_table_uses_every_link_trigger() -> None:
    assert {row.trigger for row in LINK_TRANSITIONS} == set(LinkTrigger)
    assert REDIS_LINK.initial == LinkState.IDLE
