"""RPTQ channel clustering: k-means on per-channel ranges, the permutation that makes clusters contiguous.

RPTQ (Yuan et al., 2023) describes each activation channel by its calibrated ``(min, max)`` and
groups channels with similar ranges, so that each group can be quantized with its own scale and
zero point. Here:

- :func:`kmeans` clusters points (rows) with k-means++ seeding and Lloyd iterations from a
  seeded generator, so the result depends only on the data and the seed;
- :func:`cluster_channels` clusters ``(min, max)`` pairs and renumbers the clusters in a
  canonical order (by centre: lowest ``max - min`` first, ties by centre coordinates), so that
  the labels do not depend on which seed point happened to become cluster 0;
- :func:`contiguous_permutation` is the stable ordering of channels by cluster label:
  ``x[..., perm]`` holds cluster 0, then cluster 1, ...; :func:`within_blocks_permutation` does
  the same inside each fixed-size block (attention heads) so that block boundaries stay;
- :func:`segments` lists the contiguous runs of equal labels, :func:`cluster_ranges` the
  quantization range of each cluster (always containing 0);
- :func:`uint_qparams` / :func:`fake_quantize` give asymmetric uint quantization at any bit width.

Only NumPy; the ``rptq`` pass does the graph plumbing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "ChannelClusters",
    "cluster_channels",
    "cluster_ranges",
    "contiguous_permutation",
    "fake_quantize",
    "fake_quantize_weight",
    "inverse_permutation",
    "is_permutation",
    "kmeans",
    "segments",
    "uint_qparams",
    "within_blocks_permutation",
]


def kmeans(
    points: np.ndarray, k: int, *, seed: int = 0, iterations: int = 100, restarts: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of ``points [N, D]`` into at most ``k`` clusters.

    k-means++ seeding, then Lloyd iterations until the labels stop changing; ``restarts`` runs
    from one seeded generator, the lowest within-cluster sum of squares kept (first on ties).
    Returns ``(labels [N] int64 in 0..K-1, centres [K, D])`` with ``K = min(k, distinct points)``;
    every cluster is non-empty.
    """
    x = np.asarray(points, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans: expected a non-empty [N, D] array, got shape {x.shape}")
    if k < 1 or iterations < 1 or restarts < 1:
        raise ValueError(
            f"kmeans: need k, iterations, restarts >= 1, got {k}, {iterations}, {restarts}"
        )
    if not np.isfinite(x).all():
        raise ValueError("kmeans: the points hold NaN or infinite values")
    distinct = np.unique(x, axis=0).shape[0]
    k = min(k, distinct)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        centres = _plus_plus(x, k, rng)
        labels = np.full(x.shape[0], -1, np.int64)
        for _ in range(iterations):
            new = _nearest(x, centres)
            if np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = x[labels == c]
                if members.shape[0]:
                    centres[c] = members.mean(axis=0)
                else:  # an emptied cluster takes the point farthest from its centre
                    far = int(np.argmax(((x - centres[labels]) ** 2).sum(axis=1)))
                    centres[c] = x[far]
                    labels[far] = c
        labels = _nearest(x, centres)
        labels, centres = _compact(x, labels)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    assert best is not None
    return best[1], best[2]


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++: each next centre drawn with probability proportional to squared distance."""
    centres = [x[int(rng.integers(x.shape[0]))]]
    dist = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 0.0:  # fewer distinct points left than clusters asked (guarded above)
            break
        idx = int(rng.choice(x.shape[0], p=dist / total))
        centres.append(x[idx])
        dist = np.minimum(dist, ((x - x[idx]) ** 2).sum(axis=1))
    return np.array(centres, np.float64)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    return np.argmin(d, axis=1).astype(np.int64)


def _compact(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop empty clusters; renumber labels 0..K-1 and recompute the centres."""
    used = np.unique(labels)
    remap = np.full(int(labels.max()) + 1, -1, np.int64)
    remap[used] = np.arange(used.shape[0])
    labels = remap[labels]
    centres = np.stack([x[labels == c].mean(axis=0) for c in range(used.shape[0])])
    return labels, centres


@dataclasses.dataclass(frozen=True)
class ChannelClusters:
    """Cluster label of every channel, in canonical order (narrowest range first)."""

    labels: np.ndarray  # [C] int64 in 0..K-1
    centres: np.ndarray  # [K, 2]: mean (min, max) of each cluster

    @property
    def count(self) -> int:
        return int(self.centres.shape[0])


def cluster_channels(
    ch_min: np.ndarray, ch_max: np.ndarray, k: int, *, seed: int = 0
) -> ChannelClusters:
    """k-means on the ``(min, max)`` of each channel; clusters renumbered canonically.

    Cluster 0 has the narrowest mean range ``max - min``; ties are broken by the centre's min
    then max. Channels that were never observed (infinite min/max) count as ``(0, 0)``.
    """
    lo = np.asarray(ch_min, np.float64)
    hi = np.asarray(ch_max, np.float64)
    if lo.shape != hi.shape or lo.ndim != 1:
        raise ValueError(
            f"cluster_channels: min {lo.shape} and max {hi.shape} must be one 1-D shape"
        )
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    # k-means on the points sorted by value, so that the clusters do not depend on the order of
    # the channels: a reordered activation clusters the same way (the pass is then idempotent).
    points = np.stack([lo, hi], axis=1)
    order_in = np.lexsort((hi, lo))
    sorted_labels, centres = kmeans(points[order_in], k, seed=seed)
    labels = np.empty_like(sorted_labels)
    labels[order_in] = sorted_labels
    order = np.lexsort((centres[:, 1], centres[:, 0], centres[:, 1] - centres[:, 0]))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return ChannelClusters(labels=rank[labels].astype(np.int64), centres=centres[order])


def contiguous_permutation(labels: np.ndarray) -> np.ndarray:
    """``perm`` such that ``labels[perm]`` is sorted (stable: channel order kept inside a cluster)."""
    return np.argsort(np.asarray(labels), kind="stable").astype(np.int64)


def within_blocks_permutation(keys: np.ndarray, block: int) -> np.ndarray:
    """Stable sort of ``keys [B * block]`` inside each consecutive block of ``block`` channels.

    Block boundaries (attention heads) stay where they are: ``perm[i] // block == i // block``.
    """
    keys = np.asarray(keys)
    if block < 1 or keys.ndim != 1 or keys.shape[0] % block:
        raise ValueError(
            f"within_blocks_permutation: {keys.shape[0]} channels are not blocks of {block}"
        )
    blocks = keys.reshape(-1, block)
    local = np.argsort(blocks, axis=1, kind="stable")
    return (local + np.arange(blocks.shape[0])[:, None] * block).reshape(-1).astype(np.int64)


def is_permutation(perm: np.ndarray, n: int) -> bool:
    perm = np.asarray(perm)
    return perm.shape == (n,) and np.array_equal(np.sort(perm), np.arange(n))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def segments(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal labels: ``[(start, stop, label), ...]`` covering ``0..C``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] == 0:
        raise ValueError("segments: expected a non-empty 1-D label array")
    cuts = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [labels.shape[0]]])
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, stops, strict=True)]


def cluster_ranges(
    ch_min: np.ndarray, ch_max: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster ``(lo [K], hi [K])``: min of the members' min and max of their max, widened to hold 0."""
    lo = np.zeros(count, np.float64)
    hi = np.zeros(count, np.float64)
    mins = np.where(np.isfinite(ch_min), ch_min, 0.0)
    maxs = np.where(np.isfinite(ch_max), ch_max, 0.0)
    np.minimum.at(lo, labels, mins)
    np.maximum.at(hi, labels, maxs)
    return lo, hi


def uint_qparams(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric unsigned quantization of ``[lo, hi]`` (each containing 0) to ``2**bits`` levels.

    Returns float32 scales and integer zero points (float64 holding integers) of the same shape;
    a zero-width range gets scale 1 and zero point 0.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"uint_qparams: bits must be in 2..8, got {bits}")
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmax = 2**bits - 1
    width = hi - lo
    scale = np.where(width > 0, width / qmax, 1.0)
    zero = np.where(width > 0, np.clip(np.rint(-lo / scale), 0, qmax), 0.0)
    return scale.astype(np.float32), zero


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """``(clip(round(x / s) + z, 0, 2**bits - 1) - z) * s``, broadcasting ``s, z`` over the last axis."""
    q = np.clip(np.rint(x / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).astype(np.asarray(x).dtype)


def fake_quantize_weight(weight: np.ndarray, bits: int, block: int = 32) -> np.ndarray:
    """The weight ``[in, out]`` as the integer kernels see it, in float.

    ``bits=8``: symmetric int8, one scale per output column (the ``quantize`` pass's format).
    ``bits=4``: asymmetric uint4 per block of ``block`` input rows and output column, with a
    zero point per block (the layout of ONNX Runtime's ``MatMulNBits``).
    """
    w = np.asarray(weight, np.float64)
    if w.ndim != 2:
        raise ValueError(f"fake_quantize_weight: expected [in, out], got shape {w.shape}")
    if bits == 8:
        absmax = np.abs(w).max(axis=0)
        scale = np.where(absmax > 0, absmax / 127.0, 1.0)
        return (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)
    if bits != 4 or block < 1:
        raise ValueError(
            f"fake_quantize_weight: bits must be 8 or 4 (block >= 1), got {bits}, {block}"
        )
    rows = w.shape[0]
    pad = (-rows) % block
    padded = np.concatenate([w, np.zeros((pad, w.shape[1]))]) if pad else w
    blocks = padded.reshape(-1, block, w.shape[1])
    lo = np.minimum(blocks.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(blocks.max(axis=1, keepdims=True), 0.0)
    scale = np.where(hi - lo > 0, (hi - lo) / 15.0, 1.0)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    q = np.clip(np.rint(blocks / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(padded.shape)[:rows].astype(np.float32)
