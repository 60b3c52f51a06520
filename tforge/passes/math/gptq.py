"""GPTQ: block-wise weight quantization with the rounding errors compensated through the Hessian.

For a linear ``y = x W`` (``W [K, N]``) and its input's second moment ``H = E[x x^T]`` ``[K, K]``,
the output error of a quantized ``W_q`` is ``tr((W - W_q)^T H (W - W_q))``. GPTQ (Frantar et al.,
2023) quantizes the input rows of ``W`` one at a time; after row ``k`` is rounded, the rows not
yet quantized absorb its error (the optimal brain surgeon update), computed from the upper
Cholesky factor ``U`` of ``H^-1`` (damped: ``H + damp * mean(diag H) * I``):

    e = (w_k - q_k) / U[k, k],        W[j] -= U[k, j] * e   for j > k.

Updates are applied lazily in batches of rows (``batch``). The grids are ``MatMulNBits``'
blocks of ``block`` consecutive rows per output column (:mod:`tforge.passes.math.block_quant`),
which has no permutation input (``g_idx``) on the fast path, so:

- in natural order (``act_order=False``) a block's scales are computed when its first row comes
  up, from the rows as the updates left them (the classic GPTQ groups);
- with ``act_order`` (rows by decreasing ``H[k, k]``, the inputs with the most energy first,
  which matters most for outlier channels) the blocks are still the natural contiguous ones,
  so their scales are fixed before the loop from the original weight ("static groups"), and
  each row is rounded on the grid of the block it belongs to.

``clip`` search (both orders): for each block, the range is shrunk by the factor of ``clips``
whose rounding error, weighted by ``diag(H)``, is least, before GPTQ runs on those grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tforge.passes.math import block_quant as bq

__all__ = ["DEFAULT_CLIPS", "GptqResult", "gptq_quantize", "search_clip"]

DEFAULT_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)


@dataclasses.dataclass(frozen=True)
class GptqResult:
    q: bq.BlockQuantized
    error: float  # tr(D^T H D) of the result, D = W - dequantize(q), with the undamped H
    rtn_error: float  # the same for round to nearest on ORT's own scales (the baseline)


def search_clip(
    w: np.ndarray,
    diag_h: np.ndarray,
    bits: int,
    block: int,
    symmetric: bool,
    clips: Sequence[float] = DEFAULT_CLIPS,
) -> np.ndarray:
    """Per ``[N, n_blocks]``, the factor of ``clips`` whose RTN error weighted by ``diag(H)`` is least."""
    k, n = w.shape
    blocks = bq._padded_blocks(np.asarray(w, np.float32), block).astype(np.float64)  # [N, nb, block]
    weights = np.concatenate([np.asarray(diag_h, np.float64), np.zeros((-k) % block)]).reshape(1, -1, block)
    best_err = np.full(blocks.shape[:2], np.inf)
    best = np.ones(blocks.shape[:2], np.float32)
    for c in clips:
        q = bq.quantize_rtn(w, bits, block, symmetric, clip=float(c))
        deq = bq._padded_blocks(bq.dequantize(q), block).astype(np.float64)
        err = ((blocks - deq) ** 2 * weights).sum(axis=2)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, np.float32(c), best)
    return best


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int = 4,
    block: int = 32,
    symmetric: bool = True,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    batch: int = 128,
    clips: Sequence[float] | None = DEFAULT_CLIPS,
) -> GptqResult:
    """GPTQ codes of ``w`` [K, N] on ``MatMulNBits`` blocks, from ``hessian = E[x x^T]`` (see the module)."""
    bq.check_config("gptq_quantize", bits, block)
    w64 = np.array(w, np.float64)
    k, n = w64.shape
    h = np.array(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"gptq_quantize: hessian must be [{k}, {k}], got {list(h.shape)}")
    if not damp > 0:
        raise ValueError(f"gptq_quantize: damp must be > 0, got {damp}")
    if batch % block:
        batch = max(block, batch - batch % block)  # a block never straddles two lazy batches
    diag = np.diag(h).copy()
    dead = diag <= 0  # inputs that were always zero: their rows cannot matter
    w64[dead] = 0.0
    h[dead, dead] = 1.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(k)
    clip = search_clip(w64, np.diag(h), bits, block, symmetric, clips) if clips else None

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    if act_order:  # static groups: the natural blocks' grids, fixed from the original weight
        scales, zps = bq.block_scales(w64, bits, block, symmetric, clip)
    else:
        scales = np.zeros((n, -(-k // block)), np.float32)
        zps = None if symmetric else np.zeros(scales.shape, np.uint8)
    zp_values = np.full(scales.shape, 1 << (bits - 1), np.uint8) if symmetric else zps

    wp = w64[perm]
    hp = h[np.ix_(perm, perm)]
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper: H^-1 = U^T U
    codes = np.zeros((k, n), np.uint8)
    for i1 in range(0, k, batch):
        i2 = min(i1 + batch, k)
        w1 = wp[i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            row = perm[i1 + i]
            b = row // block
            if not act_order and row % block == 0:  # a block starts: its grid from the updated rows
                rows = w1[i : i + block]
                s, z = bq.block_scales(
                    np.concatenate([rows, np.zeros((block - rows.shape[0], n))]) if rows.shape[0] < block else rows,
                    bits, block, symmetric, clip[:, b : b + 1] if clip is not None else None,
                )  # fmt: skip
                scales[:, b] = s[:, 0]
                if zps is not None and z is not None:
                    zps[:, b] = z[:, 0]
                    zp_values = zps
            c = bq.grid_codes(w1[i], scales[:, b], zp_values[:, b], bits)
            q = bq.grid_values(c, scales[:, b], zp_values[:, b]).astype(np.float64)
            codes[i1 + i] = c
            e = (w1[i] - q) / u[i1 + i, i1 + i]
            w1[i:] -= np.outer(u[i1 + i, i1 + i : i2], e)
            err1[i] = e
        wp[i2:] -= u[i1:i2, i2:].T @ err1
    natural = np.empty_like(codes)
    natural[perm] = codes
    k_pad = scales.shape[1] * block
    padded = np.zeros((n, k_pad), np.uint8)
    padded[:, :k] = natural.T
    padded[:, k:] = zp_values[:, -1:] if k_pad > k else padded[:, k:]
    q = bq.BlockQuantized(codes=padded, scales=scales, zero_points=None if symmetric else zps, bits=bits, block=block, k=k)
    h0 = np.array(hessian, np.float64)
    rtn = bq.quantize_rtn(np.asarray(w, np.float32), bits, block, symmetric)
    return GptqResult(
        q=q,
        error=bq.output_error(w, bq.dequantize(q), h0),
        rtn_error=bq.output_error(w, bq.dequantize(rtn), h0),
    )
