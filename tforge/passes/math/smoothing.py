"""Smoothing scales: move activation outliers into weights, per input channel.

For a linear ``y = x @ W`` (``W`` of shape ``[C, out]``, rows = input channels) and any positive
``s`` of shape ``[C]``, ``y = (x / s) @ (s[:, None] * W)``. SmoothQuant chooses

    s_j = max|X_j| ** alpha / max_i |W_ji| ** (1 - alpha)

so that channel ``j``'s activation range and weight range meet halfway (``alpha = 0.5``) or
lean one way. When several linears read the same activation they share ``s``, and the weight
range of row ``j`` is the max over all of them.

Scales may also be tied across channels (``groups``): with grouped-query attention a value
channel feeds several query heads, so the output projection's input channels of those heads
must take the same scale. ``groups[j]`` is the group of channel ``j``; ranges are reduced over
each group before the formula, and the group's scale is given back to every member.

Only NumPy here; the passes (``smoothquant``, ``ln-migrate``) do the graph plumbing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = [
    "AlphaChoice",
    "INT8_LEVELS",
    "choose_alpha",
    "kv_channel_groups",
    "quantization_error_proxy",
    "reduce_groups",
    "smoothing_scales",
    "weight_row_absmax",
]

#: Steps of a symmetric int8 grid over ``[-a, a]`` (``-127.5 .. 127.5`` half-steps).
INT8_LEVELS = 255


def weight_row_absmax(weights: Sequence[np.ndarray]) -> np.ndarray:
    """``max_i |W_ji|`` over every column of every weight (each ``[C, out_k]``): shape ``[C]``."""
    if not weights:
        raise ValueError("weight_row_absmax: no weights given")
    channels = weights[0].shape[0]
    out = np.zeros(channels, np.float64)
    for w in weights:
        if w.ndim != 2 or w.shape[0] != channels:
            raise ValueError(
                f"weight_row_absmax: every weight must be [{channels}, out], got {list(w.shape)}"
            )
        np.maximum(out, np.abs(w).max(axis=1).astype(np.float64), out=out)
    return out


def reduce_groups(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Max of ``values`` over each group: ``out[g] = max(values[groups == g])``, shape ``[G]``.

    ``groups`` holds ids ``0..G-1``; every id must occur.
    """
    groups = np.asarray(groups)
    if groups.shape != values.shape:
        raise ValueError(
            f"reduce_groups: groups has shape {groups.shape}, values {values.shape}"
        )
    count = int(groups.max()) + 1 if groups.size else 0
    if count and len(np.unique(groups)) != count:
        raise ValueError("reduce_groups: group ids must be 0..G-1 with none missing")
    out = np.full(count, -np.inf)
    np.maximum.at(out, groups, values.astype(np.float64))
    return out


def kv_channel_groups(num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """Group of each output-projection input channel under grouped-query attention.

    Channel ``h * head_dim + d`` of the merged context comes from value channel
    ``(h // (num_heads // num_kv_heads)) * head_dim + d``: consecutive query heads share a KV
    head (``repeat_kv`` / ``repeat_interleave`` order). Returns ``[num_heads * head_dim]`` ids in
    ``0 .. num_kv_heads * head_dim - 1``, each id being that value channel.
    """
    if num_heads <= 0 or num_kv_heads <= 0 or head_dim <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"kv_channel_groups: {num_heads} query heads cannot share {num_kv_heads} KV heads "
            f"(head_dim {head_dim})"
        )
    group = num_heads // num_kv_heads
    heads = np.arange(num_heads) // group
    return (heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def smoothing_scales(
    act_absmax: np.ndarray,
    weight_absmax: np.ndarray,
    alpha: float,
    *,
    min_scale: float = 1e-5,
    max_scale: float = 1e5,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Per-channel ``s = act_absmax**alpha / weight_absmax**(1-alpha)``, clamped, ``[C]`` float64.

    A channel (or group) whose activation or weight range is zero keeps ``s = 1``: nothing
    was observed to balance, and a huge scale would amplify whatever appears there later.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing_scales: alpha must be in [0, 1], got {alpha}")
    if not 0.0 < min_scale <= 1.0 <= max_scale:
        raise ValueError(
            f"smoothing_scales: need 0 < min_scale <= 1 <= max_scale, got {min_scale}, {max_scale}"
        )
    act = np.asarray(act_absmax, np.float64)
    wgt = np.asarray(weight_absmax, np.float64)
    if act.shape != wgt.shape or act.ndim != 1:
        raise ValueError(
            f"smoothing_scales: activation range {act.shape} and weight range {wgt.shape} "
            "must be the same 1-D shape"
        )
    if groups is not None:
        act, wgt = reduce_groups(act, groups), reduce_groups(wgt, groups)
    live = (act > 0) & (wgt > 0) & np.isfinite(act) & np.isfinite(wgt)
    scale = np.ones_like(act)
    scale[live] = act[live] ** alpha / wgt[live] ** (1.0 - alpha)
    scale = np.clip(scale, min_scale, max_scale)
    return scale[np.asarray(groups)] if groups is not None else scale


def quantization_error_proxy(
    act_absmax: np.ndarray,
    act_mean_sq: np.ndarray,
    weights: Sequence[np.ndarray],
    scale: np.ndarray,
) -> float:
    """Expected relative output error of int8 linears after smoothing by ``scale``.

    Model: the activation ``x' = x / s`` is quantized per tensor on a symmetric grid of step
    ``dx = 2 max_j |x'_j| / 255``, each weight ``W' = s[:, None] * W`` per output column ``k``
    with step ``dw_k = 2 max_j |W'_jk| / 255``; rounding errors are independent and uniform
    (variance ``step**2 / 12``) and independent of the signal. Then for output ``k``

        E[err_k^2] = dx^2/12 * sum_j W'_jk^2  +  dw_k^2/12 * sum_j E[x'_j^2]

    Each linear's error, summed over its outputs, is divided by its signal power
    ``sum_j E[x_j^2] ||W_j||^2`` (independent channels; unchanged by smoothing) so that linears
    of different size weigh alike; the result is the sum over the linears. Only per-channel
    absmax and second moments are needed, which is all calibration keeps.
    """
    s = np.asarray(scale, np.float64)
    act = np.asarray(act_absmax, np.float64)
    msq = np.asarray(act_mean_sq, np.float64)
    if not (s.shape == act.shape == msq.shape) or s.ndim != 1:
        raise ValueError(
            f"quantization_error_proxy: scale {s.shape}, absmax {act.shape} and mean_sq "
            f"{msq.shape} must be the same 1-D shape"
        )
    dx = 2.0 * float((act / s).max(initial=0.0)) / INT8_LEVELS
    smoothed_msq = float((msq / (s * s)).sum())
    total = 0.0
    for w in weights:
        w64 = np.asarray(w, np.float64)
        row_sq = (w64 * w64).sum(axis=1)
        signal = float(msq @ row_sq)
        if signal <= 0.0:
            continue
        dw = 2.0 * np.abs(w64 * s[:, None]).max(axis=0) / INT8_LEVELS
        act_term = dx * dx / 12.0 * float((s * s) @ row_sq)
        weight_term = float((dw * dw).sum()) / 12.0 * smoothed_msq
        total += (act_term + weight_term) / signal
    return total


@dataclasses.dataclass(frozen=True)
class AlphaChoice:
    """The alpha with the smallest error proxy, its scales, and the proxy at every grid point."""

    alpha: float
    scale: np.ndarray
    errors: dict[float, float]


def choose_alpha(
    act_absmax: np.ndarray,
    act_mean_sq: np.ndarray,
    weights: Sequence[np.ndarray],
    grid: Sequence[float],
    *,
    min_scale: float = 1e-5,
    max_scale: float = 1e5,
    groups: np.ndarray | None = None,
) -> AlphaChoice:
    """Evaluate :func:`quantization_error_proxy` at each alpha of ``grid``; keep the smallest.

    Ties go to the earlier grid point, so the choice is deterministic.
    """
    if not grid:
        raise ValueError("choose_alpha: the alpha grid is empty")
    w_absmax = weight_row_absmax(weights)
    errors: dict[float, float] = {}
    scales: dict[float, np.ndarray] = {}
    for alpha in grid:
        scale = smoothing_scales(
            act_absmax, w_absmax, float(alpha), min_scale=min_scale, max_scale=max_scale, groups=groups
        )
        errors[float(alpha)] = quantization_error_proxy(act_absmax, act_mean_sq, weights, scale)
        scales[float(alpha)] = scale
    best = min(errors, key=lambda a: errors[a])  # first minimum in grid order
    return AlphaChoice(alpha=best, scale=scales[best], errors=errors)
