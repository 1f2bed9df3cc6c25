"""Capacity: what makes a load step fail, and the search for the highest rate that passes.

A step passes with nothing lost, echoed, garbled or out of order, p99 latency under
``P99_LIMIT_MS``, and the generator on time. When a step fails with the generator nearly at
its core's limit, the failure may be the generator's as much as the server's: such a step is
marked (``GEN_LIMIT``), and a capacity found below it is only a lower bound. The search steps
the per-client rate up by ``growth`` until a step fails (down if the first one fails), then
bisects between the last pass and the first failure; it never asks more than ``GEN_MAX_MSGS``
messages a second of the generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.loadgen import StepResult

P99_LIMIT_MS = 50.0
GEN_MAX_MSGS = 50_000.0
"""Messages per second one generator process can send, each with its own ``send``, while the
server under test has the other core (measured: about 60,000 here); capacity steps stop there."""
GEN_LIMIT = "generator limit"
GEN_BUSY = 0.9
"""A failed step with the generator this busy (fraction of its core) may be the generator's
failure as much as the server's."""


def judge(res: StepResult) -> list[str]:
    """Why a step fails (nothing: it passes): loss and the like, p99, a late or busy sender."""
    why = list(res.errors)
    if not res.p99_ms < P99_LIMIT_MS:
        why.append(f"p99 {res.p99_ms:.1f} ms")
    if res.rate and res.send_s > res.duration * 1.2 + 0.2:
        why.append(f"{GEN_LIMIT}: sending took {res.send_s:.1f}s for {res.duration:.1f}s")
    if why and res.gen_cpu_frac >= GEN_BUSY:
        why.append(f"{GEN_LIMIT}: its CPU at {res.gen_cpu_frac:.0%}")
    return why


def short(res: StepResult, why: list[str]) -> str:
    """One line of progress for a step."""
    verdict = "ok" if not why else "FAIL " + "; ".join(why)
    return (f"{res.clients}x{res.rate:g}/s -> {res.offered_deliveries:,.0f} deliv/s: "
            f"p50 {res.p50_ms:.2f} p99 {res.p99_ms:.2f} ms, gen cpu {res.gen_cpu_frac:.2f}, "
            f"{verdict}")


@dataclass
class Capacity:
    """What a search found: deliveries per second at the highest passing rate (None: none
    passed), a note when that is only a bound, the rate above it and why that step failed."""

    deliveries: float | None = None
    note: str = ""
    passed_rate: float | None = None
    failed_rate: float | None = None
    failed_why: list[str] = field(default_factory=list)


def search(trial: Callable[[float], list[str]], clients: int, start: float, *, growth: float,
           refine: int, max_up: int = 10**9, min_rate: float = 0.0) -> Capacity:
    """Capacity at ``clients`` clients; ``trial(rate)`` runs one step at ``rate`` messages per
    second per client and says why it failed (nothing: it passed)."""
    failed: dict[float, list[str]] = {}

    def passes(rate: float) -> bool:
        why = trial(rate)
        if why:
            failed[rate] = why
        return not why

    max_rate = GEN_MAX_MSGS / clients
    lo, hi = _bracket(passes, min(start, max_rate), max_rate, growth=growth, max_up=max_up,
                      min_rate=min_rate)
    if lo is not None and hi is not None:
        for _ in range(refine):
            mid = math.sqrt(lo * hi)
            if passes(mid):
                lo = mid
            else:
                hi = mid
    n = clients
    found = Capacity(passed_rate=lo, failed_rate=hi, failed_why=failed.get(hi, []) if hi else [])
    if lo is None:
        found.note = f"fails even at {hi:g} msg/s per client"
        return found
    found.deliveries = lo * n * (n - 1)
    if hi is None:
        found.note = (f"at least: no failure up to {lo:g} msg/s per client (the generator's "
                      "limit)")
    elif any(w.startswith(GEN_LIMIT) for w in found.failed_why):
        found.note = (f"at least: the step above, {hi:g} msg/s per client, failed with the "
                      "generator at its limit")
    return found


def _bracket(trial: Callable[[float], bool], rate: float, max_rate: float, *, growth: float,
             max_up: int, min_rate: float) -> tuple[float | None, float | None]:
    if trial(rate):
        for _ in range(max_up):
            if rate >= max_rate:
                return rate, None
            nxt = min(rate * growth, max_rate)
            if not trial(nxt):
                return rate, nxt
            rate = nxt
        return rate, None
    hi = rate
    for _ in range(4):
        rate /= growth
        if rate < min_rate:
            break
        if trial(rate):
            return rate, hi
        hi = rate
    return None, hi
