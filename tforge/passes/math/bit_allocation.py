"""Mixed precision: one option (bit width) per layer, least total sensitivity under a size budget.

Layer ``i`` has options ``j`` (e.g. 4-bit, 8-bit, float), each with a sensitivity ``e[i][j] >= 0``
(the error it adds; additive over layers) and a cost ``c[i][j] >= 0`` (bytes, or bits x
parameters). :func:`allocate` chooses one option per layer minimising ``sum_i e[i][j_i]`` subject
to ``sum_i c[i][j_i] <= budget``: a multiple-choice knapsack, solved exactly by dynamic
programming over costs counted in whole *units* of ``g`` bytes.

``g`` is fixed by the problem alone, never by the budget: ``ceil(sum_i max_j c[i][j] /
resolution)`` (1 when the costs are small), so the table has at most ``resolution + 1`` columns.
Each option's cost is rounded *up* to units, and the capacity *down*; a choice the table accepts
therefore fits the budget in exact costs. Two consequences the tests check:

- the budget is respected exactly (in the exact costs, not only in units);
- more budget never raises the total sensitivity: a larger capacity admits a superset of choices
  and the table returns the least total among them.

The price of the rounding is at most one unit per layer of budget left unused (with the default
resolution, ``L / 65536`` of the all-float size for ``L`` layers). When the table finds nothing
but the cheapest option of every layer fits in exact costs, that is returned (it is then the only
choice the rounding loses, and its total is never below the table's when the table has one); when
the least-error option of every layer fits, that is returned without the table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_RESOLUTION", "Allocation", "allocate"]

DEFAULT_RESOLUTION = 1 << 16


@dataclasses.dataclass(frozen=True)
class Allocation:
    choice: list[int]  # per layer, the index of its option
    cost: float  # sum of the chosen options' exact costs (<= the budget)
    error: float  # sum of the chosen options' sensitivities
    unit: int  # the cost unit the table counted in


def allocate(
    errors: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    *,
    resolution: int = DEFAULT_RESOLUTION,
) -> Allocation:
    """The option per layer with the least total error whose total cost is ``<= budget``.

    Raises ValueError when even the cheapest option of every layer exceeds the budget (the
    message gives that least cost), or on malformed input.
    """
    if len(errors) != len(costs):
        raise ValueError(f"allocate: {len(errors)} layers of errors but {len(costs)} of costs")
    if resolution < 1:
        raise ValueError(f"allocate: resolution must be >= 1, got {resolution}")
    if not budget >= 0:
        raise ValueError(f"allocate: budget must be >= 0, got {budget}")
    err = [np.asarray(e, np.float64) for e in errors]
    cost = [np.asarray(c, np.float64) for c in costs]
    for i, (e, c) in enumerate(zip(err, cost, strict=True)):
        if e.ndim != 1 or e.shape != c.shape or not e.size:
            raise ValueError(f"allocate: layer {i} needs as many errors as costs (at least one)")
        if np.any(~np.isfinite(e)) or np.any(e < 0) or np.any(~np.isfinite(c)) or np.any(c < 0):
            raise ValueError(f"allocate: layer {i} has a negative or non-finite error or cost")
    if not err:
        return Allocation([], 0.0, 0.0, 1)
    cheapest = [int(np.lexsort((e, c))[0]) for e, c in zip(err, cost, strict=True)]  # least cost, then error
    least = math.fsum(float(c[j]) for c, j in zip(cost, cheapest, strict=True))
    if least > budget:
        raise ValueError(f"allocate: the budget {budget:g} is below the least total cost {least:g}")

    unit = max(1, math.ceil(math.fsum(float(c.max()) for c in cost) / resolution))
    free = [int(np.lexsort((c, e))[0]) for e, c in zip(err, cost, strict=True)]  # least error, then cost
    if math.fsum(float(c[j]) for c, j in zip(cost, free, strict=True)) <= budget:
        choice = free  # the unconstrained optimum fits: no rounding may cost it
        return Allocation(
            choice, math.fsum(float(cost[i][j]) for i, j in enumerate(choice)),
            math.fsum(float(err[i][j]) for i, j in enumerate(choice)), unit,
        )  # fmt: skip
    capacity = int(min(math.floor(budget / unit), resolution + len(err)))  # all of it fits in the latter
    units = [np.ceil(c / unit).astype(np.int64) for c in cost]
    # best[c]: the least total error of the layers so far with total units <= c
    best = np.zeros(capacity + 1)
    picks = np.empty((len(err), capacity + 1), np.int16)
    for i, (e, u) in enumerate(zip(err, units, strict=True)):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, np.int16)
        for j in range(e.size):
            need = int(u[j])
            if need > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[need:] = best[: capacity + 1 - need] + e[j]
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = j
        best, picks[i] = new, pick
    if not np.isfinite(best[capacity]):  # the rounding lost the only fitting choices
        choice = cheapest
    else:
        choice = [0] * len(err)
        c = capacity
        for i in range(len(err) - 1, -1, -1):
            j = int(picks[i, c])
            choice[i] = j
            c -= int(units[i][j])
    total_cost = math.fsum(float(cost[i][j]) for i, j in enumerate(choice))
    total_error = math.fsum(float(err[i][j]) for i, j in enumerate(choice))
    return Allocation(choice, total_cost, total_error, unit)
