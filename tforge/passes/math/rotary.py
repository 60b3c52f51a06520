"""Rotary position embeddings: the cos/sin caches ONNX Runtime's fused attention reads (pure NumPy).

A rotary embedding in the ``rotate_half`` form (Hugging Face's LLaMA family) computes, for a
token at position ``p`` and a head vector ``x`` of even size ``d``::

    y = x * cos(p) + rotate_half(x) * sin(p),   rotate_half(x) = concat(-x[d/2:], x[:d/2])

where ``cos(p)`` and ``sin(p)`` repeat their first half: ``cos(p)[i] = cos(p)[i + d/2]``.
ORT's ``GroupQueryAttention`` (``do_rotary=1``, ``rotary_interleaved=0``) and ``RotaryEmbedding``
take only that first half, as caches ``[max_positions, d/2]`` indexed by position.
:func:`half_caches` turns the full tables a graph computes (for positions ``0 .. n-1``) into those
caches, refusing tables that are not of that form.
"""

from __future__ import annotations

import numpy as np

__all__ = ["half_caches", "rotate_half_reference"]


def half_caches(cos: np.ndarray, sin: np.ndarray, *, atol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``(cos_cache, sin_cache)`` of shape ``[n, d/2]`` from full tables ``[n, d]`` (row = position).

    Raises ``ValueError`` when the tables do not repeat their first half (an interleaved or
    partial rotary embedding, or not a rotary table at all), or when ``cos^2 + sin^2 != 1``.
    """
    cos = np.asarray(cos, dtype=np.float64)
    sin = np.asarray(sin, dtype=np.float64)
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] % 2:
        raise ValueError(f"rotary tables must be [positions, even head size], got {cos.shape} and {sin.shape}")
    half = cos.shape[1] // 2
    for name, table in (("cos", cos), ("sin", sin)):
        if not np.allclose(table[:, :half], table[:, half:], rtol=0, atol=atol):
            raise ValueError(f"the {name} table does not repeat its first half (not the rotate_half form)")
    # An attention scaling factor (YaRN, LongRoPE) multiplies both tables: allowed, but the
    # rows must then all have the same norm; a plain rotary table has norm 1.
    norms = cos[:, :half] ** 2 + sin[:, :half] ** 2
    if not np.allclose(norms, norms.flat[0], rtol=1e-5, atol=atol):
        raise ValueError("cos^2 + sin^2 differs between positions (not a rotary table)")
    return (
        np.ascontiguousarray(cos[:, :half], dtype=np.float32),
        np.ascontiguousarray(sin[:, :half], dtype=np.float32),
    )


def rotate_half_reference(
    x: np.ndarray, positions: np.ndarray, cos_cache: np.ndarray, sin_cache: np.ndarray
) -> np.ndarray:
    """``x`` [batch, heads, seq, d] rotated at ``positions`` [batch, seq] with half caches (tests)."""
    cos = cos_cache[positions][:, None]  # [batch, 1, seq, d/2]
    sin = sin_cache[positions][:, None]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
