"""Mixed-precision allocation: least total sensitivity under a size budget (passes/math/bit_allocation.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tforge.passes.math.bit_allocation import allocate


def _layers(rng: np.random.Generator, count: int) -> tuple[list[list[float]], list[list[int]]]:
    """Options 4-bit, 8-bit, float per layer: errors falling ~16x a step, costs of packed sizes."""
    errors, costs = [], []
    for _ in range(count):
        k, n = (int(v) for v in rng.choice([64, 128, 256, 512], size=2))
        e4 = float(rng.lognormal(-4, 1.5))
        errors.append([e4, e4 / float(rng.uniform(10, 30)), 0.0])
        blocks = k // 32
        costs.append([k * n // 2 + 4 * n * blocks, k * n + 4 * n * blocks, 4 * k * n])
    return errors, costs


def _brute_force(errors: list[list[float]], costs: list[list[int]], budget: float) -> float:
    best = np.inf
    for choice in itertools.product(*(range(len(e)) for e in errors)):
        if sum(costs[i][j] for i, j in enumerate(choice)) <= budget:
            best = min(best, sum(errors[i][j] for i, j in enumerate(choice)))
    return best


def test_exact_costs_give_the_optimum_of_a_brute_force_search(rng: np.random.Generator) -> None:
    errors, costs = _layers(rng, 6)
    costs = [[c // 64 for c in row] for row in costs]  # small integers: one unit is one byte
    least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in np.linspace(least, most, 9):
        found = allocate(errors, costs, float(budget))
        assert found.unit == 1
        assert found.cost <= budget
        assert found.error == pytest.approx(_brute_force(errors, costs, float(budget)), rel=1e-12, abs=1e-15)


def test_the_budget_is_respected_in_exact_bytes_and_more_budget_never_raises_the_error(
    rng: np.random.Generator,
) -> None:
    errors, costs = _layers(rng, 40)
    least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
    previous = np.inf
    for budget in np.linspace(least, most, 60):
        found = allocate(errors, costs, float(budget), resolution=1024)  # coarse units: rounding matters
        assert found.unit > 1
        exact = sum(costs[i][j] for i, j in enumerate(found.choice))
        assert exact == found.cost <= budget
        assert found.error == pytest.approx(sum(errors[i][j] for i, j in enumerate(found.choice)))
        assert found.error <= previous * (1 + 1e-12)
        previous = found.error
    assert previous == 0.0  # the whole float size: nothing is quantized
    assert allocate(errors, costs, float(least)).choice == [0] * len(errors)  # only all-4-bit fits


def test_a_layer_with_a_huge_sensitivity_gets_more_bits(rng: np.random.Generator) -> None:
    errors, costs = _layers(rng, 12)
    budget = sum(c[0] for c in costs) + 0.5 * sum(c[1] - c[0] for c in costs)
    plain = allocate(errors, costs, budget)
    victim = next(i for i, j in enumerate(plain.choice) if j == 0)  # a layer left at 4 bits
    errors[victim] = [1e6 * e for e in errors[victim]]

    found = allocate(errors, costs, budget)

    assert found.choice[victim] > 0
    assert found.cost <= budget


def test_an_impossible_budget_says_the_least_cost() -> None:
    with pytest.raises(ValueError, match="below the least total cost 30"):
        allocate([[1.0, 0.0], [1.0, 0.0]], [[10, 40], [20, 80]], 29.0)
    with pytest.raises(ValueError, match="as many errors as costs"):
        allocate([[1.0, 0.0]], [[10]], 100.0)
    assert allocate([], [], 0.0).choice == []
