"""Int8 quantization math: symmetric per-channel weights, asymmetric uint8 activation ranges.

Pure NumPy; the ``quantize`` and ``rptq`` passes lower linears with it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QMAX", "dequantize_weight", "quantize_weight", "uint8_qparams", "weight_error"]

QMAX = 127  # symmetric int8 range [-127, 127]: no -128, so negation never overflows


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantization of a ``[in, out]`` weight.

    Returns ``(q, scale)`` with ``q`` int8 ``[in, out]`` in [-127, 127] and ``scale`` float32
    ``[out]``; an all-zero column gets scale 1 (its codes are all zero).
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight: expected a 2-D [in, out] weight, got shape {w.shape}")
    absmax = np.abs(w).max(axis=0)
    scale = np.where(absmax > 0, absmax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[None, :]


def weight_error(weight: np.ndarray, q: np.ndarray, scale: np.ndarray) -> float:
    """Relative Frobenius error ``||W - dq(q)|| / ||W||`` (0 for an all-zero weight)."""
    w = np.asarray(weight, dtype=np.float64)
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        return 0.0
    return float(np.linalg.norm(w - dequantize_weight(q, scale).astype(np.float64)) / norm)


def uint8_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point for the range ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    if not lo <= 0.0 <= hi:
        raise ValueError(f"uint8_qparams: the range [{lo}, {hi}] must contain 0")
    scale = (hi - lo) / 255.0
    if scale <= 0.0:
        return np.float32(1.0), np.uint8(0)
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero_point)
