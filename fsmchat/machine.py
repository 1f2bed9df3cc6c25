"""Models of a lifecycle table: one shared ``transitions`` machine per table, a fast ``fire``.

Each kind of socket (client connection, Redis link, scraper) is a subclass of ``TableModel``
(through ``sock.LoopSocket``) bound to
its table in ``lifecycle``; every instance is a model of that class's one machine. ``fire``
reads the table:

- a row that changes state goes through the machine, which checks the source, sets ``state`` and
  runs the row's action;
- an internal row (``readable``/``writable``, the hot path) runs the same action directly, which
  skips the machine's bookkeeping (it costs microseconds per call) but not the table: the row is
  looked up exactly as the machine would, and a trigger with no row raises ``InvalidTrigger``.
"""

from __future__ import annotations

import logging
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
        table[state][trigger] = (row.dest, row.action or "")
    return table


class TableModel:
    """Base of every model: ``class Link(TableModel, lifecycle=REDIS_LINK)`` binds the table."""

    __slots__ = ("state",)  # every model has a state; the slotted ones nothing else per instance

    lifecycle: ClassVar[Lifecycle]
    machine: ClassVar[Machine]
    """The one machine every instance shares (add_model/remove_model), built from the table.

    ``model_override`` binds only methods a model declares, and models declare none: without it
    every instance would carry some thirty bound helpers (``readable``, ``may_readable``,
    ``is_reading``, ...), about 9 kB each, that nothing here calls."""
    _dispatch: ClassVar[Dispatch]
    state: str  # owned by the machine

    def __init_subclass__(cls, lifecycle: Lifecycle | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: Lifecycle | None = lifecycle or getattr(cls, "lifecycle", None)
        if table is not None:  # model_override would replace these with trigger functions
            clashes = sorted({str(row.trigger) for row in table.transitions} & set(dir(cls)))
            if clashes:
                raise TypeError(f"{cls.__name__} has attributes named like triggers: {clashes}")
        if lifecycle is not None:
            cls.lifecycle = lifecycle
            cls.machine = Machine(model=None, send_event=False, model_override=True,
                                  **lifecycle.machine_config())
            cls._dispatch = dispatch_table(lifecycle)

    def fire(self, trigger: str) -> None:
        state = self.state
        row = self._dispatch[state].get(trigger)
        if row is None:
            raise InvalidTrigger(state, trigger)
        dest, action = row
        if dest is None:
            getattr(self, action)()
            return
        self.changing(state, dest, trigger)
        self.machine.events[trigger].trigger(self)

    def changing(self, source: str, dest: str, trigger: str) -> None:
        """Called before a state change: where a model logs it."""
