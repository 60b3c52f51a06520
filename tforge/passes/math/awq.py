"""AWQ: activation-aware per-input-channel scales before block-wise weight rounding.

For linears ``y_i = x W_i`` (``W_i [K, N_i]``, all reading the same ``x``), dividing input channel
``k`` of ``x`` by ``s_k`` and multiplying row ``k`` of every ``W_i`` by it changes nothing in float;
rounding ``s W_i`` instead of ``W_i`` does change the error: the rows of channels that carry
large activations get finer grids, relative to their size, than the rest of their block
(Lin et al., 2024). The output error of a candidate ``s`` is measured exactly from the input's
second moment ``G = E[x x^T]``:

    E||x W - (x / s) Q(s W)||^2 = tr(D^T G D),   D = W - diag(1/s) Q(diag(s) W),

summed over the linears. The candidates are AWQ's ``s = m^alpha`` for ``alpha`` on a grid,
``m`` the channels' activation magnitude (the RMS ``sqrt(E[x_k^2])`` here), normalised by
``sqrt(max(s) min(s))``; ``alpha = 0`` is ``s = 1``, round to nearest, so the search never
returns a scale worse than RTN on the calibration statistics. Channels that must share a scale
(the output projection's input channels that read the same V channel under grouped-query
attention) pool their magnitudes first.

:func:`quantize_clipped` then picks, per block, the range shrink with the least rounding error
weighted by ``diag(G)``, and keeps it only when the full output error is lower than without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tforge.passes.math import block_quant as bq
from tforge.passes.math.gptq import DEFAULT_CLIPS, search_clip

__all__ = ["DEFAULT_ALPHAS", "AwqResult", "awq_scales", "quantize_clipped", "scaled_error", "search_scale"]

DEFAULT_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 21))
_MIN_SCALE, _MAX_SCALE = 1e-4, 1e4


@dataclasses.dataclass(frozen=True)
class AwqResult:
    scale: np.ndarray  # [K] float64: rows of each W multiplied by it, x divided by it
    alpha: float  # 0: s = 1 (nothing to move)
    error: float  # sum_i tr(D_i^T G D_i) with ``scale`` (float64)
    rtn_error: float  # the same with s = 1: round to nearest on ORT's scales


def awq_scales(magnitude: np.ndarray, alpha: float, groups: np.ndarray | None = None) -> np.ndarray:
    """``s = m^alpha / sqrt(max * min)`` (float64 ``[K]``); ``groups[k]`` ids share one scale."""
    m = np.asarray(magnitude, np.float64)
    if m.ndim != 1:
        raise ValueError(f"awq_scales: magnitude must be [K], got shape {list(m.shape)}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != m.shape:
            raise ValueError(f"awq_scales: groups must be [{m.shape[0]}], got {list(groups.shape)}")
        _, inverse = np.unique(groups, return_inverse=True)
        pooled = np.bincount(inverse, weights=m) / np.bincount(inverse)
        m = pooled[inverse]
    top = float(m.max()) if m.size else 0.0
    if top <= 0 or alpha == 0:
        return np.ones_like(m)
    s = np.maximum(m, top * 1e-6) ** alpha  # dead channels: the smallest scale, not zero
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, _MIN_SCALE, _MAX_SCALE)


def scaled_error(
    weights: Sequence[np.ndarray],
    gram: np.ndarray,
    scale: np.ndarray,
    bits: int,
    block: int,
    symmetric: bool,
) -> float:
    """``sum_i tr(D_i^T G D_i)``, ``D_i = W_i - diag(1/s) Q(diag(s) W_i)`` with RTN for ``Q``."""
    s = np.asarray(scale, np.float64)
    total = 0.0
    for w in weights:
        w64 = np.asarray(w, np.float64)
        scaled = (s[:, None] * w64).astype(np.float32)  # what the graph will hold
        w_hat = bq.dequantize(bq.quantize_rtn(scaled, bits, block, symmetric)).astype(np.float64) / s[:, None]
        total += bq.output_error(w64, w_hat, gram)
    return total


def search_scale(
    weights: Sequence[np.ndarray],
    gram: np.ndarray,
    magnitude: np.ndarray,
    bits: int = 4,
    block: int = 32,
    symmetric: bool = True,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    groups: np.ndarray | None = None,
) -> AwqResult:
    """The scale ``m^alpha`` (``alpha`` in ``alphas``, 0 always tried) with the least output error."""
    bq.check_config("awq.search_scale", bits, block)
    if not weights:
        raise ValueError("awq.search_scale: no weights")
    k = int(np.asarray(weights[0]).shape[0])
    gram = np.asarray(gram, np.float64)
    if gram.shape != (k, k) or any(np.asarray(w).shape[0] != k for w in weights):
        raise ValueError(f"awq.search_scale: weights [{k}, N] and a gram [{k}, {k}] are needed")
    if np.asarray(magnitude).shape != (k,):
        raise ValueError(f"awq.search_scale: magnitude must be [{k}]")
    ones = np.ones(k)
    rtn = scaled_error(weights, gram, ones, bits, block, symmetric)
    best = AwqResult(ones, 0.0, rtn, rtn)
    for alpha in sorted({float(a) for a in alphas} - {0.0}):
        s = awq_scales(magnitude, alpha, groups)
        err = scaled_error(weights, gram, s, bits, block, symmetric)
        if err < best.error:
            best = AwqResult(s, alpha, err, rtn)
    return best


def quantize_clipped(
    w: np.ndarray,
    gram: np.ndarray | None,
    bits: int,
    block: int,
    symmetric: bool,
    clips: Sequence[float] | None = DEFAULT_CLIPS,
) -> bq.BlockQuantized:
    """RTN of ``w`` with the per-block clip search, kept only where it lowers ``tr(D^T G D)``."""
    q = bq.quantize_rtn(w, bits, block, symmetric)
    if gram is None or not clips:
        return q
    gram = np.asarray(gram, np.float64)
    clip = search_clip(w, np.diag(gram), bits, block, symmetric, clips)
    if np.all(clip == 1):
        return q
    clipped = bq.quantize_rtn(w, bits, block, symmetric, clip=clip)
    w64 = np.asarray(w, np.float64)
    if bq.output_error(w64, bq.dequantize(clipped), gram) < bq.output_error(w64, bq.dequantize(q), gram):
        return clipped
    return q
