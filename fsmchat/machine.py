"""Models of a lifecycle table: one shared ``transitions`` machine per table, a compiled ``fire``.

Each kind of socket (client connection, Redis link, scraper) is a subclass of ``TableModel``
(through ``sock.LoopSocket``) bound to its table in ``lifecycle``; every instance is a model of
that class's one ``TableMachine``. The machine is built from the table, checks it, draws it and is
the reference the tests hold ``fire`` to (``tests/test_dispatch.py``: fed the same triggers, both
reach the same states through the same actions and refuse the same triggers). ``fire`` is the
table compiled for the loop: ``state -> trigger -> (dest, action)``, one dict lookup, then what the
machine would do for these tables (they have no conditions, no enter/exit callbacks and no
``before``: set ``state``, run the action), without the machine's per-call bookkeeping (an
``EventData``, partials, callback resolution: microseconds for each of the four state changes a
connection makes, which at a few thousand connections per second was most of their cost).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from transitions import Machine

from fsmchat.lifecycle import InvalidTrigger, Lifecycle

# transitions logs every callback at INFO, and each binding model_override skips at WARNING.
logging.getLogger("transitions").setLevel(logging.ERROR)

Dispatch = dict[str, dict[str, tuple[str | None, str]]]


def dispatch_table(lifecycle: Lifecycle) -> Dispatch:
    """state -> trigger -> (dest, action name): the table reduced to what ``fire`` reads.

    ``fire`` runs an internal row's action itself, so such a row must name one (a row that
    changes state may have none: the machine runs whatever it names)."""
    table: Dispatch = {str(state): {} for state in lifecycle.states}
    for (state, trigger), row in lifecycle.rows.items():
        if row.dest is None and not row.action:
            raise ValueError(f"{lifecycle.name}: the internal row {trigger!r} in {state!r} "
                             "names no action")
        table[state][trigger] = (str(row.dest) if row.dest else None, row.action or "")
    return table


class Models:
    """A machine's models by identity: adding and removing is O(1), where ``transitions`` keeps
    a list that it scans on every ``add_model`` (``not in``) and ``remove_model``; iteration
    keeps the order of arrival, as the list did."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, object] = {}

    def append(self, model: object) -> None:
        self._by_id[id(model)] = model

    def remove(self, model: object) -> None:
        if self._by_id.pop(id(model), None) is None:
            raise ValueError(f"{model!r} is not a model of this machine")

    def __contains__(self, model: object) -> bool:
        return id(model) in self._by_id

    def __iter__(self) -> Iterator[object]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __getitem__(self, index: int) -> object:
        return list(self._by_id.values())[index]


class TableMachine(Machine):
    """The ``transitions`` machine of one table, whose models carry nothing but their state.

    Models bind none of the machine's helpers (``model_override``, and ``TableModel`` refuses a
    class that declares one of their names), so registering a model is setting its initial state
    and adding it to ``models``: both O(1), and nothing per trigger or per state."""

    def __init__(self, **config: Any) -> None:
        super().__init__(model=None, send_event=False, model_override=True, **config)
        self.models = Models()  # type: ignore[assignment] # used as the list it replaces

    def add_model(self, model: Any, initial: Any = None) -> None:
        if model not in self.models:
            setattr(model, self.model_attribute, initial or self.initial)
            self.models.append(model)

    def remove_model(self, model: Any) -> None:
        self.models.remove(model)


def machine_names(table: Lifecycle) -> set[str]:
    """What the machine would bind on a model: its triggers, ``trigger``, ``may_*``, ``is_*``,
    and the ``on_enter_*``/``on_exit_*`` callbacks it would pick up from one."""
    triggers = {str(row.trigger) for row in table.transitions}
    states = {str(state) for state in table.states}
    return ({"trigger", "may_trigger"} | triggers | {f"may_{t}" for t in triggers}
            | {f"{kind}_{s}" for s in states for kind in ("is", "on_enter", "on_exit")})


class TableModel:
    """Base of every model: ``class Link(TableModel, lifecycle=REDIS_LINK)`` binds the table."""

    __slots__ = ("state",)  # every model has a state; the slotted ones nothing else per instance

    lifecycle: ClassVar[Lifecycle]
    machine: ClassVar[TableMachine]
    """The one machine every instance shares (add_model/remove_model), built from the table.

    ``model_override`` binds only methods a model declares, and models declare none: without it
    every instance would carry some thirty bound helpers (``readable``, ``may_readable``,
    ``is_reading``, ...), about 9 kB each, that nothing here calls."""
    _dispatch: ClassVar[Dispatch]
    state: str  # owned by the machine

    def __init_subclass__(cls, lifecycle: Lifecycle | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: Lifecycle | None = lifecycle or getattr(cls, "lifecycle", None)
        if table is not None:  # model_override would replace these with the machine's helpers
            clashes = sorted(machine_names(table) & set(dir(cls)))
            if clashes:
                raise TypeError(f"{cls.__name__} has attributes named like triggers or the "
                                f"machine's helpers: {clashes}")
        if lifecycle is not None:
            cls.lifecycle = lifecycle
            cls.machine = TableMachine(**lifecycle.machine_config())
            cls._dispatch = dispatch_table(lifecycle)

    def fire(self, trigger: str) -> None:
        firing(trigger)(self)

    def changing(self, source: str, dest: str, trigger: str) -> None:
        """Called before a state change: where a model logs it."""


@functools.cache
def firing(trigger: str) -> Callable[[TableModel], None]:
    """``fire(trigger)`` as a function of the model alone, one per trigger name (the rows are
    the model's own table's): as a method (``on_readable = firing("readable")``) what the loop
    calls on every readiness is one call, not two."""
    trigger = str(trigger)

    def fire(model: TableModel) -> None:
        state = model.state
        row = model._dispatch[state].get(trigger)
        if row is None:
            raise InvalidTrigger(state, trigger)
        dest, action = row
        if dest is not None:
            model.changing(state, dest, trigger)
            model.state = dest
        if action:
            getattr(model, action)()

    fire.__name__ = fire.__qualname__ = f"fire_{trigger}"
    return fire

