"""Pruning math: importance scores, grouped-query selections, budgets and compensation (NumPy only)."""

from __future__ import annotations

import numpy as np
import pytest

from tforge.passes.math import compensation, importance

# ----------------------------------------------------------------------------- scores


def test_ffn_magnitude_is_the_norm_of_each_channels_weights(rng: np.random.Generator) -> None:
    up, gate, down = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(5, 3))
    scores = importance.ffn_magnitude(up, down, gate)
    j = 2
    expected = np.sqrt((up[:, j] ** 2).sum() + (gate[:, j] ** 2).sum() + (down[j] ** 2).sum())
    assert scores.shape == (5,) and scores[j] == pytest.approx(expected)
    with pytest.raises(ValueError, match="intermediate width"):
        importance.ffn_magnitude(up, down[:4], gate)


def test_ffn_activation_is_the_expected_output_energy(rng: np.random.Generator) -> None:
    x = rng.normal(loc=rng.normal(size=4), scale=rng.uniform(0.1, 3.0, size=4), size=(20000, 4))
    down = rng.normal(size=(4, 3))
    raw = importance.ffn_activation(down, (x**2).mean(axis=0))
    # E||x_j W_j||^2 measured on the samples themselves
    measured = np.array([((x[:, [j]] * down[j]) ** 2).sum(axis=1).mean() for j in range(4)])
    np.testing.assert_allclose(raw, measured, rtol=1e-10)
    centered = importance.ffn_activation(down, (x**2).mean(axis=0), x.mean(axis=0), centered=True)
    np.testing.assert_allclose(centered, x.var(axis=0) * (down**2).sum(axis=1), rtol=1e-8)
    with pytest.raises(ValueError, match="means"):
        importance.ffn_activation(down, (x**2).mean(axis=0), centered=True)


def test_head_scores_group_channels_by_head(rng: np.random.Generator) -> None:
    heads, kv, d = 4, 2, 3
    q, k, v = rng.normal(size=(5, 12)), rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    o = rng.normal(size=(12, 5))
    mag = importance.head_magnitude(q, k, v, o, heads, kv, d)
    h = 3  # query head 3 reads KV head 1 (columns 3..5), shared with query head 2
    expected = (q[:, 9:12] ** 2).sum() + (o[9:12] ** 2).sum() + ((k[:, 3:6] ** 2).sum() + (v[:, 3:6] ** 2).sum()) / 2
    assert mag[h] == pytest.approx(np.sqrt(expected))
    mean_sq = rng.uniform(0.5, 2.0, size=12)
    act = importance.head_activation(o, mean_sq, heads, d)
    assert act[1] == pytest.approx(float((mean_sq[3:6, None] * o[3:6] ** 2).sum()))
    with pytest.raises(ValueError, match="do not match"):
        importance.head_magnitude(q, k, v, o, heads, 4, d)


# ----------------------------------------------------------------------------- selections


def test_gqa_sizes_and_nearest_size() -> None:
    assert importance.gqa_sizes(9, 3) == [0, 1, 2, 3, 4, 6, 9]
    assert importance.gqa_sizes(4, 4) == [0, 1, 2, 3, 4]
    assert importance.nearest_gqa_size(9, 3, 6.75) == 6
    assert importance.nearest_gqa_size(9, 3, 8.1) == 9
    assert importance.nearest_gqa_size(4, 2, 3.0) == 4  # tie between 2 and 4 keeps more


def test_select_heads_keeps_grouping_valid() -> None:
    # 6 heads on 2 KV heads: group 0 = heads 0..2, group 1 = heads 3..5
    scores = np.array([5.0, 4.0, 0.1, 3.0, 0.2, 0.3])
    two_per_group = importance.select_heads(scores, 2, 4)
    assert two_per_group.heads == (0, 1, 3, 5) and two_per_group.kv_heads == (0, 1)
    assert two_per_group.per_group == 2
    # 3 heads: one whole group (9.1) beats one head from each of 3 groups (impossible: 2 groups)
    whole = importance.select_heads(scores, 2, 3)
    assert whole.heads == (0, 1, 2) and whole.kv_heads == (0,) and whole.per_group == 3
    # one head from each group (5 + 3) beats two from one group (5 + 4)? no: 9 > 8
    pair = importance.select_heads(scores, 2, 2)
    assert pair.heads == (0, 1) and pair.kv_heads == (0,)
    assert importance.select_heads(scores, 2, 0).heads == ()
    with pytest.raises(ValueError, match="valid sizes are"):
        importance.select_heads(scores, 2, 5)


def test_select_channels_and_rounding() -> None:
    scores = np.array([3.0, 1.0, 2.0, 1.0, 5.0])
    np.testing.assert_array_equal(importance.select_channels(scores, 3), [0, 2, 4])
    np.testing.assert_array_equal(importance.select_channels(scores, 4), [0, 1, 2, 4])  # tie: lower index
    assert importance.round_to_multiple(1152.0, 1536, 32) == 1152
    assert importance.round_to_multiple(1160.0, 1536, 32) == 1152
    assert importance.round_to_multiple(10.0, 1536, 32) == 32
    assert importance.round_to_multiple(11.4, 16, 32) == 11  # narrower than the multiple


def test_global_budget_ranks_shares_and_caps_layers() -> None:
    flat = np.ones(4)
    skewed = np.array([10.0, 0.01, 0.01, 0.01])
    # the skewed layer's three small units have the smallest shares and go first
    assert importance.global_keep([flat, skewed], 3, 1.0) == [4, 1]
    # with a cap of 50% per layer, the rest comes from the other layer
    assert importance.global_keep([flat, skewed], 3, 0.5) == [3, 2]


# ----------------------------------------------------------------------------- compensation


def _correlated(rng: np.random.Generator, n: int = 4000, c: int = 8) -> np.ndarray:
    mix = rng.normal(size=(c, c)) + 2 * np.eye(c)
    return rng.normal(size=(n, c)) @ mix + rng.normal(size=c)


def test_mean_shift_restores_the_mean_output(rng: np.random.Generator) -> None:
    x, w = _correlated(rng), rng.normal(size=(8, 3))
    removed, kept = np.array([1, 5]), np.array([0, 2, 3, 4, 6, 7])
    delta = compensation.mean_shift(w, removed, x.mean(axis=0))
    np.testing.assert_allclose((x[:, kept] @ w[kept] + delta).mean(axis=0), (x @ w).mean(axis=0), atol=1e-9)


def test_refit_is_least_squares_and_beats_the_bias_fix(rng: np.random.Generator) -> None:
    x, w = _correlated(rng), rng.normal(size=(8, 3))
    kept = np.array([0, 2, 3, 4, 6, 7])
    g, m = x.T @ x / x.shape[0], x.mean(axis=0)
    rows, delta = compensation.refit(w, kept, g, m, ridge=0.0)
    # the same fit straight from the samples: [x_k, 1] -> x W
    design = np.hstack([x[:, kept], np.ones((x.shape[0], 1))])
    solution = np.linalg.lstsq(design, x @ w, rcond=None)[0]
    np.testing.assert_allclose(rows, solution[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(delta, solution[-1], rtol=1e-6, atol=1e-8)

    def error(out: np.ndarray) -> float:
        return float(((out - x @ w) ** 2).mean())

    plain = error(x[:, kept] @ w[kept])
    biased = error(x[:, kept] @ w[kept] + compensation.mean_shift(w, np.array([1, 5]), m))
    refitted = error(x[:, kept] @ rows + delta)
    assert refitted < 0.5 * biased < plain


def test_refit_changes_nothing_when_removed_rows_are_zero(rng: np.random.Generator) -> None:
    x, w = _correlated(rng), rng.normal(size=(8, 3))
    w[[1, 5]] = 0.0
    kept = np.array([0, 2, 3, 4, 6, 7])
    rows, delta = compensation.refit(w, kept, x.T @ x / len(x), x.mean(axis=0), ridge=1e-2)
    np.testing.assert_array_equal(rows, w[kept])
    np.testing.assert_array_equal(delta, np.zeros(3))


def test_greedy_removal_costs_are_refit_errors(rng: np.random.Generator) -> None:
    x, w = _correlated(rng), rng.normal(size=(8, 3))
    w[6] = 0.0  # carries nothing: removed first, at no cost
    g, m = x.T @ x / x.shape[0], x.mean(axis=0)
    order, costs = compensation.greedy_removal(w, g, m, 3, ridge=0.0)
    assert order[0] == 6 and costs[0] == pytest.approx(0.0, abs=1e-12)
    # after removing the first two, the refit error equals the sum of their costs
    kept = np.setdiff1d(np.arange(8), order[:2])
    rows, delta = compensation.refit(w, kept, g, m, ridge=0.0)
    error = float((((x[:, kept] @ rows + delta) - x @ w) ** 2).sum(axis=1).mean())
    assert error == pytest.approx(costs[:2].sum(), rel=1e-6)
    # a head is a group of channels: removing group 1 alone costs its refit error
    group = compensation.group_removal_costs(w, g, m, 2, ridge=0.0)
    kept = np.array([0, 1, 4, 5, 6, 7])
    rows, delta = compensation.refit(w, kept, g, m, ridge=0.0)
    error = float((((x[:, kept] @ rows + delta) - x @ w) ** 2).sum(axis=1).mean())
    assert group[1] == pytest.approx(error, rel=1e-6)
