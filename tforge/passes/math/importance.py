"""Which FFN channels and attention heads to keep: scores, GQA-valid selections, budgets.

Scores (higher = more important), all from weights and calibration statistics, no gradients:

- *magnitude* (the structured-pruning baseline): the L2 norm of every weight that belongs to
  the unit. An FFN channel ``j`` owns column ``j`` of up (and gate) and row ``j`` of down; a query
  head owns its Q columns and its output-projection rows, plus ``1 / group size`` of its KV
  head's K and V columns (the KV head is shared by its group).
- *activation*: the unit's expected contribution to the output energy of the projection that
  reads it. Channel ``c`` of that projection's input ``x`` contributes ``x_c W[c, :]``, whose
  expected squared norm is ``E[x_c^2] ||W[c, :]||^2``; a head sums this over its ``head_dim``
  channels of the output projection's input. With ``centered=True`` the variance replaces
  ``E[x_c^2]``: that is the error left once the channel's mean contribution is folded into the
  bias (see :mod:`tforge.passes.math.compensation`).

Grouped-query attention constrains which head sets are valid: the graph repeats each KV head
for a fixed number of query heads, so every kept KV head must keep the same number ``r`` of its
query heads, and a KV head goes only together with all of its query heads. A valid set is thus
``kv_kept`` groups times ``r`` heads; :func:`select_heads` picks the best one of a given size.

Budgets turn a removal ratio into kept counts per layer: *uniform* (the same fraction in every
layer) or *global* (rank the units of all layers together by their share of their layer's total
score, capped per layer by ``max_layer_ratio``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "kept_counts",
    "HeadSelection",
    "ffn_activation",
    "ffn_magnitude",
    "global_keep",
    "gqa_sizes",
    "head_activation",
    "head_magnitude",
    "nearest_gqa_size",
    "round_to_multiple",
    "select_channels",
    "select_heads",
]


# ----------------------------------------------------------------------------- FFN channels


def ffn_magnitude(up: np.ndarray, down: np.ndarray, gate: np.ndarray | None = None) -> np.ndarray:
    """``[I]``: L2 norm of channel ``j``'s weights: up[:, j], gate[:, j] and down[j, :]."""
    _check_ffn(up, down, gate)
    energy = _col_sq(up) + _row_sq(down)
    if gate is not None:
        energy = energy + _col_sq(gate)
    return np.sqrt(energy)


def ffn_activation(
    down: np.ndarray, mean_sq: np.ndarray, mean: np.ndarray | None = None, *, centered: bool = False
) -> np.ndarray:
    """``[I]``: expected output energy ``E[x_j^2] ||down[j, :]||^2`` of each channel of down's input.

    ``centered=True`` uses ``Var[x_j] = E[x_j^2] - E[x_j]^2`` (needs ``mean``).
    """
    return _input_energy(down, mean_sq, mean, centered) * _row_sq(down)


# ----------------------------------------------------------------------------- heads


def head_magnitude(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> np.ndarray:
    """``[H]``: L2 norm of each query head's Q columns and O rows plus its share of its KV head.

    ``q`` is ``[in, H*d]``, ``k`` and ``v`` are ``[in, KV*d]``, ``o`` is ``[H*d, out]``.
    """
    _check_heads(num_heads, num_kv_heads, head_dim, q.shape[1], k.shape[1], v.shape[1], o.shape[0])
    group = num_heads // num_kv_heads
    q_e = _col_sq(q).reshape(num_heads, head_dim).sum(axis=1)
    o_e = _row_sq(o).reshape(num_heads, head_dim).sum(axis=1)
    kv_e = (_col_sq(k) + _col_sq(v)).reshape(num_kv_heads, head_dim).sum(axis=1)
    return np.sqrt(q_e + o_e + np.repeat(kv_e, group) / group)


def head_activation(
    o: np.ndarray,
    mean_sq: np.ndarray,
    num_heads: int,
    head_dim: int,
    mean: np.ndarray | None = None,
    *,
    centered: bool = False,
) -> np.ndarray:
    """``[H]``: each head's share of the output projection's output energy on calibration data,
    ``sum over its channels c of E[x_c^2] ||o[c, :]||^2`` (variance instead with ``centered``)."""
    if o.ndim != 2 or o.shape[0] != num_heads * head_dim:
        raise ValueError(
            f"head_activation: o must be [{num_heads * head_dim}, out], got {list(o.shape)}"
        )
    per_channel = _input_energy(o, mean_sq, mean, centered) * _row_sq(o)
    return per_channel.reshape(num_heads, head_dim).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class HeadSelection:
    """Kept query heads and KV heads (ascending), and query heads kept per KV head."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    per_group: int

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)


def gqa_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Head counts reachable by a valid GQA selection (``kv_kept * per_group``), ascending, with 0."""
    group = _group(num_heads, num_kv_heads)
    return sorted({kv * r for kv in range(num_kv_heads + 1) for r in range(1, group + 1)} | {0})


def nearest_gqa_size(num_heads: int, num_kv_heads: int, target: float) -> int:
    """The valid head count nearest to ``target``; ties go to the larger count (keep more)."""
    sizes = gqa_sizes(num_heads, num_kv_heads)
    return min(sizes, key=lambda s: (abs(s - target), -s))


def select_heads(scores: np.ndarray, num_kv_heads: int, keep: int) -> HeadSelection:
    """The valid head set of size ``keep`` with the largest total score.

    Query head ``h`` reads KV head ``h // group``. Every factorisation ``keep = kv_kept * r`` is
    tried: each KV group offers its ``r`` best heads, and the ``kv_kept`` groups with the largest
    such sums are kept. Raises ValueError when ``keep`` is not a valid size.
    """
    scores = np.asarray(scores, np.float64)
    num_heads = scores.shape[0]
    group = _group(num_heads, num_kv_heads)
    if keep == 0:
        return HeadSelection((), (), 0)
    best: tuple[float, HeadSelection] | None = None
    for r in range(1, group + 1):
        if keep % r or keep // r > num_kv_heads:
            continue
        kv_kept = keep // r
        grouped = scores.reshape(num_kv_heads, group)
        # stable: among equal scores the lower index wins, so selections are deterministic
        order = np.argsort(-grouped, axis=1, kind="stable")[:, :r]
        sums = np.take_along_axis(grouped, order, axis=1).sum(axis=1)
        groups = np.sort(np.argsort(-sums, kind="stable")[:kv_kept])
        heads = tuple(int(g * group + h) for g in groups for h in np.sort(order[g]))
        total = float(sums[groups].sum())
        if best is None or total > best[0]:
            best = (total, HeadSelection(heads, tuple(int(g) for g in groups), r))
    if best is None:
        raise ValueError(
            f"select_heads: {keep} of {num_heads} heads on {num_kv_heads} KV heads is not a valid "
            f"grouped-query selection; valid sizes are {gqa_sizes(num_heads, num_kv_heads)}"
        )
    return best[1]


# ----------------------------------------------------------------------------- budgets


def select_channels(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of the ``keep`` highest scores; ties keep the lower index."""
    scores = np.asarray(scores, np.float64)
    if not 0 <= keep <= scores.shape[0]:
        raise ValueError(f"select_channels: keep must be in [0, {scores.shape[0]}], got {keep}")
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def round_to_multiple(keep: float, size: int, multiple: int) -> int:
    """``keep`` rounded to the nearest multiple of ``multiple`` in ``[multiple, size]``.

    A layer narrower than ``multiple`` (or already not a multiple of it) is rounded to whole
    channels only, so that small models can still be pruned.
    """
    if multiple <= 1 or size < multiple:
        return int(min(max(round(keep), 1), size))
    rounded = int(round(keep / multiple)) * multiple
    return int(min(max(rounded, multiple), size))


def global_keep(
    scores: Sequence[np.ndarray], remove: int, max_layer_ratio: float, *, normalize: bool = True
) -> list[int]:
    """Kept counts per layer when the ``remove`` least important units of all layers go.

    Units are ranked by their share of their layer's total score, so layers with different
    output scales compete fairly (``normalize=False``: by the scores as given, for scores that
    are already comparable); no layer loses more than ``max_layer_ratio`` of its units.
    """
    if not 0.0 <= max_layer_ratio <= 1.0:
        raise ValueError(f"global_keep: max_layer_ratio must be in [0, 1], got {max_layer_ratio}")
    pooled: list[tuple[float, int, int]] = []
    for layer, s in enumerate(scores):
        s = np.asarray(s, np.float64)
        total = float(s.sum()) if normalize else 1.0
        share = s / total if total > 0 else np.zeros_like(s)
        pooled += [(float(share[j]), layer, j) for j in range(s.shape[0])]
    pooled.sort()
    caps = [int(math.floor(max_layer_ratio * np.asarray(s).shape[0] + 1e-9)) for s in scores]
    removed = [0] * len(scores)
    left = remove
    for _, layer, _ in pooled:
        if left <= 0:
            break
        if removed[layer] < caps[layer]:
            removed[layer] += 1
            left -= 1
    return [int(np.asarray(s).shape[0]) - r for s, r in zip(scores, removed, strict=True)]


# ----------------------------------------------------------------------------- helpers


def _col_sq(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return np.einsum("ij,ij->j", w, w)


def _row_sq(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return np.einsum("ij,ij->i", w, w)


def _input_energy(
    w: np.ndarray, mean_sq: np.ndarray, mean: np.ndarray | None, centered: bool
) -> np.ndarray:
    mean_sq = np.asarray(mean_sq, np.float64)
    if mean_sq.shape != (w.shape[0],):
        raise ValueError(
            f"importance: statistics have {mean_sq.shape[0]} channels, the weight {w.shape[0]} rows"
        )
    if not centered:
        return mean_sq
    if mean is None:
        raise ValueError("importance: centered scores need the channel means")
    return np.maximum(mean_sq - np.asarray(mean, np.float64) ** 2, 0.0)


def _check_ffn(up: np.ndarray, down: np.ndarray, gate: np.ndarray | None) -> None:
    width = up.shape[1]
    if down.shape[0] != width or (gate is not None and gate.shape != up.shape):
        raise ValueError(
            f"ffn importance: up {list(up.shape)}, gate {None if gate is None else list(gate.shape)} "
            f"and down {list(down.shape)} do not share one intermediate width"
        )


def _check_heads(heads: int, kv: int, d: int, q: int, k: int, v: int, o: int) -> None:
    _group(heads, kv)
    if q != heads * d or k != kv * d or v != kv * d or o != heads * d:
        raise ValueError(
            f"head importance: widths q={q} k={k} v={v} o={o} do not match {heads} heads, "
            f"{kv} KV heads of dim {d}"
        )


def _group(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads < 1 or num_heads < num_kv_heads or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    return num_heads // num_kv_heads


def kept_counts(
    sizes: Sequence[int],
    scores: Sequence[np.ndarray],
    *,
    ratio: float | None,
    keep: int | None,
    budget: Literal["uniform", "global"],
    max_layer_ratio: float,
    snap: Callable[[int, float], int],
    normalize: bool = True,
) -> list[int]:
    """Kept units per layer; ``snap(layer, target)`` rounds a target to a valid count."""
    if keep is not None:
        return [min(keep, size) for size in sizes]
    if ratio is None:  # check_amount guarantees ratio or keep
        raise ValueError("kept_counts: neither ratio nor keep is given")
    if budget == "uniform":
        return [snap(i, size * (1.0 - min(ratio, max_layer_ratio))) for i, size in enumerate(sizes)]
    remove = int(round(ratio * sum(sizes)))
    targets = global_keep(scores, remove, max_layer_ratio, normalize=normalize)
    return [snap(i, t) for i, t in enumerate(targets)]
