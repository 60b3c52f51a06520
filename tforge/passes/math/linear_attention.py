"""Linear attention in NumPy: feature maps, the unchunked and chunked causal forms, softmax reference.

Softmax attention weights query ``i`` against key ``j`` by ``exp(s q_i . k_j)`` normalised over
the visible keys; linear attention replaces the kernel by ``phi(q_i) . phi(k_j)`` for a feature
map ``phi`` with non-negative features, so that

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j))

costs O(N) in the sequence length: the sums over keys are computed once (non-causal) or as
prefix sums (causal). Arrays are laid out like the attention of an exported model:
``[batch, heads, seq, dim]``. A key mask ``[batch, seq]`` (1 = token, 0 = padding) removes padded
keys by zeroing their features, which takes them out of both numerator and normaliser.

The chunked causal form (what the graph computes, see :func:`chunked_causal`) splits the
sequence into chunks of ``C`` positions: inside a chunk the causal part is an explicit ``C x C``
product with a lower-triangular mask; across chunks, the state ``sum phi(k)^T v`` of all earlier
chunks is an exclusive prefix sum over the chunk axis. Memory is O(N C), never O(N^2).

Feature maps:

- ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020), positive everywhere;
- ``relu``: ``max(x, 0)``; rows can be all zero, the ``eps`` in the normaliser keeps them finite;
- ``hedgehog``: ``[softmax(x W + b), softmax(-(x W + b))]`` over features, per head (Zhang et
  al. 2024), with ``W`` ``[heads, dim, m]`` and ``b`` ``[heads, m]`` fitted so that the linear
  weights mimic softmax attention (:mod:`tforge.passes.math.feature_map_fit`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "apply_feature_map",
    "chunked_causal",
    "elu_features",
    "hedgehog_features",
    "linear_attention",
    "linear_weights",
    "relative_error",
    "relu_features",
    "softmax_attention",
    "softmax_weights",
]

EPS = 1e-6


def elu_features(x: np.ndarray) -> np.ndarray:
    """``elu(x) + 1``: ``x + 1`` for positive ``x``, ``exp(x)`` otherwise."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def relu_features(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(x, dtype=np.float64), 0.0)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def hedgehog_features(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[softmax(u), softmax(-u)]`` with ``u = x W_h + b_h`` per head ``h``.

    ``x`` ``[batch, heads, seq, dim]``, ``w`` ``[heads, dim, m]``, ``b`` ``[heads, m]``; the result
    has ``2 m`` features. Each half sums to one, so every key contributes a bounded weight.
    """
    x = np.asarray(x, dtype=np.float64)
    u = np.einsum("bhnd,hdm->bhnm", x, w) + b[None, :, None, :]
    return np.concatenate([_softmax(u), _softmax(-u)], axis=-1)


def apply_feature_map(
    kind: str, x: np.ndarray, params: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """One of ``elu``, ``relu``, ``hedgehog`` (which needs ``params = (w, b)``)."""
    if kind == "elu":
        return elu_features(x)
    if kind == "relu":
        return relu_features(x)
    if kind == "hedgehog":
        if params is None:
            raise ValueError("apply_feature_map: the hedgehog map needs its (w, b) parameters")
        return hedgehog_features(x, *params)
    raise ValueError(f"apply_feature_map: unknown feature map {kind!r} (elu, relu, hedgehog)")


def _masked_keys(phi_k: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
    if key_mask is None:
        return phi_k
    return phi_k * (np.asarray(key_mask) != 0)[:, None, :, None]


def linear_weights(
    phi_q: np.ndarray,
    phi_k: np.ndarray,
    *,
    causal: bool,
    key_mask: np.ndarray | None = None,
    eps: float = EPS,
) -> np.ndarray:
    """The normalised ``[batch, heads, Nq, Nk]`` weights linear attention gives (O(N^2); reference)."""
    a = np.einsum("bhif,bhjf->bhij", phi_q, _masked_keys(phi_k, key_mask))
    if causal:
        a = np.tril(a)
    return a / (a.sum(axis=-1, keepdims=True) + eps)


def linear_attention(
    phi_q: np.ndarray,
    phi_k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool,
    key_mask: np.ndarray | None = None,
    eps: float = EPS,
) -> np.ndarray:
    """Linear attention with normaliser, unchunked.

    Non-causal: ``phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(k_j))``. Causal: the same with prefix
    sums, computed here through the explicit lower-triangular ``phi(Q) phi(K)^T`` (the
    reference the chunked form is checked against).
    """
    phi_k = _masked_keys(phi_k, key_mask)
    if not causal:
        kv = np.einsum("bhnf,bhnd->bhfd", phi_k, v)
        z = phi_k.sum(axis=2)
        num = np.einsum("bhnf,bhfd->bhnd", phi_q, kv)
        den = np.einsum("bhnf,bhf->bhn", phi_q, z)[..., None]
        return num / (den + eps)
    a = np.tril(np.einsum("bhif,bhjf->bhij", phi_q, phi_k))
    return (a @ v) / (a.sum(axis=-1, keepdims=True) + eps)


def chunked_causal(
    phi_q: np.ndarray,
    phi_k: np.ndarray,
    v: np.ndarray,
    chunk: int,
    *,
    key_mask: np.ndarray | None = None,
    eps: float = EPS,
) -> np.ndarray:
    """Causal linear attention in chunks of ``chunk`` positions, as the emitted graph computes it.

    The sequence is zero-padded to a multiple of ``chunk`` (padded keys have zero features and
    contribute nothing; padded queries are cut off at the end).
    """
    if chunk < 1:
        raise ValueError(f"chunked_causal: chunk must be positive, got {chunk}")
    phi_k = _masked_keys(phi_k, key_mask)
    b, h, n, f = phi_q.shape
    d = v.shape[-1]
    pad = (-n) % chunk
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    qc = np.pad(phi_q, widths).reshape(b, h, -1, chunk, f)
    kc = np.pad(phi_k, widths).reshape(b, h, -1, chunk, f)
    vc = np.pad(v, widths).reshape(b, h, -1, chunk, d)
    kv = np.einsum("bhcnf,bhcnd->bhcfd", kc, vc)
    state = np.cumsum(kv, axis=2) - kv  # exclusive: the chunks strictly before
    z = kc.sum(axis=3)
    z_state = np.cumsum(z, axis=2) - z
    a = np.einsum("bhcif,bhcjf->bhcij", qc, kc) * np.tril(np.ones((chunk, chunk)))
    num = np.einsum("bhcnf,bhcfd->bhcnd", qc, state) + a @ vc
    den = np.einsum("bhcnf,bhcf->bhcn", qc, z_state)[..., None] + a.sum(axis=-1, keepdims=True)
    return (num / (den + eps)).reshape(b, h, -1, d)[:, :, :n]


def softmax_weights(
    q: np.ndarray, k: np.ndarray, *, scale: float, causal: bool, key_mask: np.ndarray | None = None
) -> np.ndarray:
    """``softmax(scale q k^T + mask)`` over keys, ``[batch, heads, Nq, Nk]``."""
    s = scale * np.einsum("bhid,bhjd->bhij", np.asarray(q, np.float64), np.asarray(k, np.float64))
    allowed = np.ones(s.shape[-2:], dtype=bool)
    if causal:
        allowed = np.tril(allowed)
    allowed = np.broadcast_to(allowed, s.shape)
    if key_mask is not None:
        allowed = allowed & (np.asarray(key_mask) != 0)[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(allowed, np.exp(s - top), 0.0)
    return e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-300)


def softmax_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    causal: bool,
    key_mask: np.ndarray | None = None,
) -> np.ndarray:
    return softmax_weights(q, k, scale=scale, causal=causal, key_mask=key_mask) @ v


def relative_error(
    reference: np.ndarray, candidate: np.ndarray, rows: np.ndarray | None = None
) -> float:
    """``||candidate - reference||^2 / ||reference||^2`` over the last axis, on the selected rows.

    ``rows`` is a boolean mask over all axes but the last (e.g. the unpadded query positions).
    """
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(candidate, dtype=np.float64) - ref
    if rows is not None:
        ref, diff = ref[rows], diff[rows]
    energy = float(np.sum(ref * ref))
    return float(np.sum(diff * diff)) / max(energy, 1e-300)
