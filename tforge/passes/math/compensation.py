"""Closed-form repair of the projection that reads pruned channels.

A projection ``y = x @ W + b`` (``W`` of shape ``[C, out]``) loses the input channels ``r`` and
keeps ``k``. Without repair the output loses ``x_r @ W_r``. Two repairs from calibration
statistics of ``x``:

- *bias* (:func:`mean_shift`): add the removed channels' mean contribution ``E[x_r] @ W_r`` to
  ``b``. What is left is the centered part, whose energy is ``Var``-weighted.
- *refit* (:func:`refit`): also change the kept rows, ``W_k' = W_k + D``, with ``D`` and the bias
  change ``c`` the least-squares fit of the lost part from the kept channels:

      min_{D, c}  E|| x_k D + c - x_r W_r ||^2 + lam ||D||^2

  Its normal equations use only the second moment ``G = E[x x^T]`` and the mean ``m = E[x]``:

      [ G_kk + lam I   m_k ] [ D ]   [ G_kr W_r ]
      [ m_k^T          1   ] [ c ] = [ m_r^T W_r ]

  The ridge term pulls ``D`` towards zero (the original weights), not the weights towards zero,
  so removing channels that carry nothing (``W_r = 0``) changes nothing. ``lam`` is
  ``ridge * mean(diag(G_kk))``, which also keeps the system solvable when kept channels are
  collinear on the calibration data.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

__all__ = ["mean_shift", "refit"]


def mean_shift(w: np.ndarray, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``[out]``: the bias change ``E[x_r] @ W_r`` that restores the removed channels' mean."""
    w = np.asarray(w, np.float64)
    mean = np.asarray(mean, np.float64)
    if mean.shape != (w.shape[0],):
        raise ValueError(f"mean_shift: mean has shape {list(mean.shape)}, W has {w.shape[0]} rows")
    removed = np.asarray(removed, np.int64)
    return mean[removed] @ w[removed]


def refit(
    w: np.ndarray,
    kept: np.ndarray,
    second_moment: np.ndarray,
    mean: np.ndarray,
    *,
    ridge: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """New kept rows ``[k, out]`` and the bias change ``[out]`` (see the module docstring)."""
    w = np.asarray(w, np.float64)
    channels = w.shape[0]
    g = np.asarray(second_moment, np.float64)
    m = np.asarray(mean, np.float64)
    if g.shape != (channels, channels) or m.shape != (channels,):
        raise ValueError(
            f"refit: statistics of shape {list(g.shape)} and {list(m.shape)} do not match "
            f"a weight with {channels} rows"
        )
    if ridge < 0:
        raise ValueError(f"refit: ridge must be >= 0, got {ridge}")
    kept = np.asarray(kept, np.int64)
    mask = np.ones(channels, bool)
    mask[kept] = False
    removed = np.flatnonzero(mask)
    w_k = w[kept]
    if removed.size == 0:
        return w_k.copy(), np.zeros(w.shape[1])
    lost = w[removed]
    k = kept.size
    g_kk = g[np.ix_(kept, kept)]
    lam = ridge * float(np.mean(np.diag(g_kk))) if k else 0.0
    system = np.empty((k + 1, k + 1))
    system[:k, :k] = g_kk + lam * np.eye(k)
    system[:k, k] = m[kept]
    system[k, :k] = m[kept]
    system[k, k] = 1.0
    rhs = np.vstack([g[np.ix_(kept, removed)] @ lost, m[removed] @ lost])
    try:
        solution = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:  # singular even with the ridge (ridge=0, constant channels)
        solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return w_k + solution[:k], solution[k]


def greedy_removal(
    w: np.ndarray,
    second_moment: np.ndarray,
    mean: np.ndarray,
    remove: int,
    *,
    ridge: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Channels in the order a greedy Optimal Brain Surgeon removes them, and the cost of each.

    With the intercept as an extra input channel that is never removed (so the refit may move the
    bias), ``A = [[G + lam I, m], [m^T, 1]]``. Removing channel ``j`` with the best refit of the
    rest costs ``||W_j||^2 / (A^-1)_jj`` of output energy; the cheapest goes, ``W`` takes the
    refit (``W -= A^-1[:, j] W_j / (A^-1)_jj``) and ``A^-1`` drops ``j`` by a rank-one update.
    Returns ``(order [remove], costs [remove])``; costs are in output-energy units.
    """
    w = np.asarray(w, np.float64)
    channels = w.shape[0]
    if not 0 <= remove <= channels:
        raise ValueError(f"greedy_removal: remove must be in [0, {channels}], got {remove}")
    g = np.asarray(second_moment, np.float64)
    m = np.asarray(mean, np.float64)
    lam = ridge * float(np.mean(np.diag(g))) if channels else 0.0
    a = np.empty((channels + 1, channels + 1))
    a[:channels, :channels] = g + lam * np.eye(channels)
    a[:channels, channels] = m
    a[channels, :channels] = m
    a[channels, channels] = 1.0
    inv = np.linalg.inv(a)
    weights = np.vstack([w, np.zeros((1, w.shape[1]))])
    alive = np.ones(channels, bool)
    order = np.empty(remove, np.int64)
    costs = np.empty(remove)
    for step in range(remove):
        diag = np.diag(inv)[:channels]
        cost = np.full(channels, np.inf)
        cost[alive] = np.einsum("ij,ij->i", weights[:channels][alive], weights[:channels][alive]) / np.maximum(
            diag[alive], 1e-300
        )
        j = int(np.argmin(cost))
        order[step], costs[step] = j, cost[j]
        column = inv[:, j] / inv[j, j]
        weights -= np.outer(column, weights[j])
        inv -= np.outer(column, inv[j])
        alive[j] = False
    return order, costs


def group_removal_costs(
    w: np.ndarray,
    second_moment: np.ndarray,
    mean: np.ndarray,
    group_size: int,
    *,
    ridge: float = 1e-3,
) -> np.ndarray:
    """``[C / group_size]``: output energy lost by removing each group of consecutive channels
    alone, after the best refit of all the others (and the bias): ``tr(W_S^T (A^-1_SS)^-1 W_S)``
    with ``A`` as in :func:`greedy_removal`. Attention heads are such groups."""
    w = np.asarray(w, np.float64)
    channels = w.shape[0]
    if group_size < 1 or channels % group_size:
        raise ValueError(f"group_removal_costs: {channels} channels do not split into groups of {group_size}")
    g = np.asarray(second_moment, np.float64)
    m = np.asarray(mean, np.float64)
    lam = ridge * float(np.mean(np.diag(g)))
    a = np.empty((channels + 1, channels + 1))
    a[:channels, :channels] = g + lam * np.eye(channels)
    a[:channels, channels] = m
    a[channels, :channels] = m
    a[channels, channels] = 1.0
    inv = np.linalg.inv(a)
    costs = np.empty(channels // group_size)
    for i in range(costs.shape[0]):
        s = slice(i * group_size, (i + 1) * group_size)
        w_s = w[s]
        costs[i] = float(np.trace(w_s.T @ np.linalg.solve(inv[s, s], w_s)))
    return costs


@dataclasses.dataclass(frozen=True)
class RowCompensation:
    """The repaired input rows of the projection reading pruned channels, and its bias change."""

    rows: np.ndarray  # [kept, out]: the kept rows, refitted for kind="refit"
    bias_delta: np.ndarray | None  # [out] to add to the projection's bias, or None
    kind: Literal["none", "bias", "refit"]
    reason: str = ""  # why a weaker kind than asked was used


def compensate_rows(
    w: np.ndarray,
    kept: np.ndarray,
    mean: np.ndarray | None,
    second_moment: np.ndarray | None,
    *,
    enabled: bool,
    refit_rows: bool,
    ridge: float,
    missing: str = "",
) -> RowCompensation:
    """Keep rows ``kept`` of ``w`` ([in, out]) and repair the output for the removed ones.

    ``mean`` is ``E[x]`` of the projection's input, ``second_moment`` ``E[x x^T]`` (None when not
    collected); ``missing`` says why no statistics can be used at all. With a second moment and
    ``refit_rows`` the kept rows are refitted (:func:`refit`); else the removed channels' mean
    contribution moves into the bias (:func:`mean_shift`).
    """
    rows = w[kept]
    removed = np.setdiff1d(np.arange(w.shape[0]), kept)
    if not enabled or removed.size == 0:
        return RowCompensation(rows, None, "none")
    if missing or mean is None:
        return RowCompensation(rows, None, "none", missing or "calibration statistics without channel sums")
    w64 = w.astype(np.float64)
    if refit_rows and second_moment is not None:
        new_rows, delta = refit(w64, kept, second_moment, mean, ridge=ridge)
        return RowCompensation(new_rows.astype(w.dtype), delta, "refit")
    delta = mean_shift(w64, removed, mean)
    return RowCompensation(rows, delta, "bias", "no Gram matrix (calibrate with gram=true)" if refit_rows else "")
