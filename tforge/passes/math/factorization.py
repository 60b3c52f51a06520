"""Low-rank and Kronecker factors of a linear's weight, plain or weighted by the activations.

A linear computes ``y = x @ W`` with ``W`` of shape ``[K, N]`` (rows are input channels). What
matters is the output error on real inputs, ``E||x W - x W~||^2 = tr((W - W~)^T S (W - W~))``
with ``S = E[x x^T]`` the ``[K, K]`` second moment of the input (from calibration). Everything
here is NumPy, in float64.

Low rank (``W ~ A B``, ``A`` ``[K, r]``, ``B`` ``[r, N]``):

- *plain*: truncated SVD of ``W``, the best rank-``r`` approximation in Frobenius norm;
- *activation-aware*: with ``S + lam I = L L^T`` (Cholesky; the ridge ``lam`` keeps it
  positive definite), take the SVD ``L^T W = U Sigma V^T`` and keep ``r`` terms:
  ``A = L^-T U_r Sigma_r^1/2``, ``B = Sigma_r^1/2 V_r^T``. Then ``x A B - x W = x L^-T (M_r - M)``
  with ``M = L^T W``, so the output error under ``S + lam I`` is the tail of ``Sigma^2``: the best
  any rank-``r`` factorization can do for these inputs.

Both are "left directions ``p_i``, singular values ``s_i``, orthonormal right directions ``v_i``"
(``p_i = u_i`` or ``L^-T u_i``), so the output error of keeping ``r`` terms, under the *measured*
``S`` (no ridge), is ``sum_{i >= r} s_i^2 p_i^T S p_i``: the cross terms vanish because the
``v_i`` are orthonormal. :class:`LowRankSpectrum` holds one decomposition and gives the factors
and that error for every rank at once, which is what a global rank allocation needs.

Kronecker (Van Loan and Pitsianis): with ``K = m1 m2`` and ``N = n1 n2``, ``W`` is approximated by
``sum_i A_i (x) B_i`` (``A_i`` ``[m1, n1]``, ``B_i`` ``[m2, n2]``). Rearranging ``W`` into the
``[m1 n1, m2 n2]`` matrix ``R(W)`` whose row ``(i1, j1)`` is the block ``W[i1 m2:(i1+1) m2,
j1 n2:(j1+1) n2]`` flattened turns every Kronecker product into a rank-one matrix
``vec(A) vec(B)^T``, so the truncated SVD of ``R(W)`` gives the best sum of ``r`` products in
Frobenius norm. The activation-aware version applies exactly when ``S`` is itself a Kronecker
product ``S1 (x) S2`` (then ``L = L1 (x) L2`` and ``L^T (A (x) B) = L1^T A (x) L2^T B``, so whitening
keeps the structure). A general ``S`` is not, and whitening by its full ``L`` would destroy the
Kronecker structure; so ``S`` is replaced by its nearest Kronecker product (itself a rank-one
problem on ``R(S)``), which is exact for inputs whose channel groups are independent and an
approximation otherwise. The error that selection uses is then the error under that
approximation; :func:`output_error` measures the true one for reporting.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "DEFAULT_RIDGE",
    "KroneckerShape",
    "KroneckerSpectrum",
    "LowRankSpectrum",
    "Method",
    "allocate_budget",
    "budget_cost",
    "auto_kronecker_shapes",
    "kronecker_params",
    "kronecker_saves",
    "kronecker_spectrum",
    "kronecker_sum",
    "kronecker_whitening",
    "low_rank_params",
    "low_rank_spectrum",
    "max_saving_rank",
    "nearest_kronecker_psd",
    "output_energy",
    "output_error",
    "parse_kronecker_shape",
    "rearrange",
    "truncated_svd",
    "whitening_factor",
]

Method = Literal["plain", "activation"]

#: Ridge added to ``S`` before the Cholesky factorization, relative to ``mean(diag(S))``.
DEFAULT_RIDGE = 1e-4


# ----------------------------------------------------------------------------- shared


def _as_weight(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"expected a non-empty 2-D [in, out] weight, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("the weight holds NaN or infinite values")
    return w


def _as_moment(second_moment: np.ndarray | None, k: int) -> np.ndarray | None:
    """``S`` as a ``[K, K]`` matrix or a ``[K]`` diagonal (per-channel mean of x^2), or None."""
    if second_moment is None:
        return None
    s = np.asarray(second_moment, dtype=np.float64)
    if s.shape not in ((k,), (k, k)):
        raise ValueError(f"second moment must have shape ({k},) or ({k}, {k}), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("the second moment holds NaN or infinite values")
    return s


def _quad_columns(p: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """``p_i^T S p_i`` for every column ``p_i`` of ``p`` (``S = I`` when None)."""
    if s is None:
        return np.einsum("ki,ki->i", p, p)
    if s.ndim == 1:
        return np.einsum("ki,k,ki->i", p, s, p)
    return np.einsum("ki,ki->i", s @ p, p)


def output_energy(weight: np.ndarray, second_moment: np.ndarray | None = None) -> float:
    """``E||x W||^2 = tr(W^T S W)`` (``||W||_F^2`` without ``S``)."""
    w = _as_weight(weight)
    return float(_quad_columns(w, _as_moment(second_moment, w.shape[0])).sum())


def output_error(
    weight: np.ndarray, approximation: np.ndarray, second_moment: np.ndarray | None = None
) -> float:
    """``E||x W - x W~||^2 = tr((W - W~)^T S (W - W~))`` (squared Frobenius error without ``S``)."""
    w = _as_weight(weight)
    approx = np.asarray(approximation, dtype=np.float64)
    if approx.shape != w.shape:
        raise ValueError(f"approximation has shape {approx.shape}, the weight {w.shape}")
    return output_energy(w - approx, second_moment)


def whitening_factor(second_moment: np.ndarray, ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, float]:
    """Lower-triangular ``L`` with ``L L^T = S + lam I`` and the ``lam`` used.

    ``lam = ridge * mean(diag(S))`` (``ridge`` alone for an all-zero ``S``); when the Cholesky
    factorization still fails (``S`` not positive semi-definite through rounding), ``lam`` grows
    tenfold until it succeeds.
    """
    s = np.asarray(second_moment, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"whitening_factor: expected a square matrix, got shape {s.shape}")
    if ridge <= 0 or not math.isfinite(ridge):
        raise ValueError(f"whitening_factor: ridge must be a finite number > 0, got {ridge}")
    s = (s + s.T) / 2.0
    scale = float(np.mean(np.diag(s)))
    lam = ridge * (scale if scale > 0 else 1.0)
    eye = np.eye(s.shape[0])
    for _ in range(12):
        try:
            return np.linalg.cholesky(s + lam * eye), lam
        except np.linalg.LinAlgError:
            lam *= 10.0
    raise ValueError("whitening_factor: the second moment is not positive semi-definite")


# ----------------------------------------------------------------------------- low rank


def low_rank_params(k: int, n: int, rank: int) -> int:
    """Parameters of ``A [K, r]`` and ``B [r, N]``."""
    return rank * (k + n)


def max_saving_rank(k: int, n: int) -> int:
    """The largest ``r`` with ``r (K + N) < K N``: beyond it a factorization saves nothing."""
    return (k * n - 1) // (k + n)


@dataclasses.dataclass(frozen=True)
class LowRankSpectrum:
    """One decomposition ``W = sum_i p_i s_i v_i^T`` and what truncating it costs.

    ``left`` ``[K, p]`` holds the ``p_i`` (``u_i`` for plain SVD, ``L^-T u_i`` when whitened),
    ``singular`` the ``s_i`` (descending), ``right`` ``[p, N]`` the orthonormal ``v_i^T``.
    ``tail[r]`` is the output error of keeping ``r`` terms under the measured second moment (the
    squared Frobenius error when none was given); ``energy`` is ``E||x W||^2`` likewise.
    """

    method: Method
    left: np.ndarray
    singular: np.ndarray
    right: np.ndarray
    tail: np.ndarray  # [p + 1]
    energy: float
    weighted: bool  # errors are under a measured second moment, not the Frobenius norm

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[1])

    @property
    def full_rank(self) -> int:
        return int(self.singular.shape[0])

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``A [K, r]`` and ``B [r, N]``, the singular values split evenly between them."""
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank must be in [1, {self.full_rank}], got {rank}")
        root = np.sqrt(self.singular[:rank])
        return self.left[:, :rank] * root[None, :], root[:, None] * self.right[:rank]

    def error(self, rank: int) -> float:
        """Output error of keeping ``rank`` terms (see the class docstring)."""
        if not 0 <= rank <= self.full_rank:
            raise ValueError(f"rank must be in [0, {self.full_rank}], got {rank}")
        return float(self.tail[rank])

    def relative_error(self, rank: int) -> float:
        """:meth:`error` over the output energy (0 for an all-zero weight)."""
        return self.error(rank) / self.energy if self.energy > 0 else 0.0

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank keeping at least ``energy`` of the output energy (1 - relative error)."""
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if self.energy <= 0:
            return 1
        kept = 1.0 - self.tail / self.energy
        ok = np.nonzero(kept >= energy - 1e-12)[0]
        return max(1, int(ok[0])) if ok.size else self.full_rank


def low_rank_spectrum(
    weight: np.ndarray,
    method: Method = "plain",
    second_moment: np.ndarray | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
) -> LowRankSpectrum:
    """Decompose ``weight [K, N]`` for truncation (plain SVD, or whitened by ``S``).

    ``second_moment`` is ``E[x x^T]`` ``[K, K]`` (or its diagonal ``[K]``, then only errors are
    weighted). ``method="activation"`` needs the full matrix.
    """
    w = _as_weight(weight)
    k, _ = w.shape
    s = _as_moment(second_moment, k)
    if method == "plain":
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        left = u
    elif method == "activation":
        if s is None or s.ndim != 2:
            raise ValueError("activation-aware SVD needs the [K, K] second moment of the input")
        lower, _ = whitening_factor(s, ridge)
        u, sv, vt = np.linalg.svd(lower.T @ w, full_matrices=False)
        left = np.linalg.solve(lower.T, u)  # L^-T U
    else:
        raise ValueError(f"method must be 'plain' or 'activation', got {method!r}")
    contributions = sv**2 * _quad_columns(left, s)
    tail = np.concatenate([np.cumsum(contributions[::-1])[::-1], [0.0]])
    return LowRankSpectrum(
        method=method,
        left=left,
        singular=sv,
        right=vt,
        tail=tail,
        energy=output_energy(w, s),
        weighted=s is not None,
    )


def truncated_svd(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain rank-``rank`` factors ``A [K, r]``, ``B [r, N]`` of ``weight``."""
    return low_rank_spectrum(weight).factors(rank)


# ----------------------------------------------------------------------------- budget


def budget_cost(relative_error: float) -> float:
    """The cost a global budget adds up over layers: the squared relative output error.

    Squaring makes one layer driven to a large error cost more than several layers with small
    errors summing to the same. In a one-off comparison on SmolLM2 (activation-aware SVD, 25% of
    the block linears' parameters removed, 32 calibration windows, WikiText-2 perplexity on 8
    windows of 512 tokens, fp32 27.8), summing relative errors gave 206, squared ones 165, cubed
    ones 163, and the same ratio in every layer 187; on MiniLM, squared ones were no worse.
    """
    return relative_error * relative_error


def allocate_budget(curves: Sequence[Sequence[tuple[int, float]]], target: int) -> list[int]:
    """Pick one option per layer so that at least ``target`` parameters go, at little error.

    ``curves[l]`` lists layer ``l``'s options as ``(parameters removed, error)``; option 0 must
    be ``(0, 0.0)``, "leave the layer alone". Greedy on the lower convex hull of each curve: the
    step taken next is, over all layers, the one with the least added error per removed
    parameter. The step that would cross ``target`` is chosen among every step that reaches it,
    as the one adding the least error. Returns the option index chosen for each layer (all 0
    when ``target <= 0``; as far as the options go when ``target`` cannot be reached).
    """
    removed_of: list[np.ndarray] = []
    error_of: list[np.ndarray] = []
    for i, curve in enumerate(curves):
        if not curve or tuple(curve[0]) != (0, 0.0):
            raise ValueError(f"allocate_budget: option 0 of layer {i} must be (0, 0.0)")
        removed_of.append(np.array([c[0] for c in curve], dtype=np.float64))
        error_of.append(np.array([c[1] for c in curve], dtype=np.float64))
    chosen = [0] * len(curves)
    removed = 0.0
    if target <= 0:
        return chosen

    def best_step(layer: int) -> tuple[float, int] | None:
        rem, err = removed_of[layer], error_of[layer]
        gain = rem - rem[chosen[layer]]
        ahead = gain > 0
        if not ahead.any():
            return None
        slope = np.full(rem.shape, np.inf)
        slope[ahead] = (err[ahead] - err[chosen[layer]]) / gain[ahead]
        best = float(slope[ahead].min())
        # on equal slope take the longest step: the options lie on the same hull edge
        ties = np.nonzero(ahead & (slope == best))[0]
        return best, int(ties[np.argmax(rem[ties])])

    heap = [(step[0], layer, step[1]) for layer in range(len(curves)) if (step := best_step(layer))]
    heapq.heapify(heap)
    while heap and removed < target:
        slope, layer, j = heapq.heappop(heap)
        if best_step(layer) != (slope, j):  # stale entry
            continue
        gain = removed_of[layer][j] - removed_of[layer][chosen[layer]]
        if removed + gain >= target:
            # The crossing step: the cheapest (in added error) of all steps that reach target.
            best_cost, best_layer, best_option = np.inf, layer, j
            for other in range(len(curves)):
                rem, err = removed_of[other], error_of[other]
                cur = chosen[other]
                reach = np.nonzero(removed + rem - rem[cur] >= target)[0]
                if reach.size:
                    costs = err[reach] - err[cur]
                    pick = int(np.argmin(costs))
                    if costs[pick] < best_cost:
                        best_cost, best_layer, best_option = float(costs[pick]), other, int(reach[pick])
            chosen[best_layer] = best_option
            return chosen
        chosen[layer] = j
        removed += gain
        step = best_step(layer)
        if step is not None:
            heapq.heappush(heap, (step[0], layer, step[1]))
    return chosen


# ----------------------------------------------------------------------------- Kronecker


@dataclasses.dataclass(frozen=True)
class KroneckerShape:
    """``W [m1 m2, n1 n2] ~ sum_i A_i [m1, n1] (x) B_i [m2, n2]``."""

    m1: int
    n1: int
    m2: int
    n2: int

    def __post_init__(self) -> None:
        if min(self.m1, self.n1, self.m2, self.n2) < 1:
            raise ValueError(f"Kronecker factor dimensions must be positive, got {self}")

    @property
    def k(self) -> int:
        return self.m1 * self.m2

    @property
    def n(self) -> int:
        return self.n1 * self.n2

    @property
    def max_terms(self) -> int:
        return min(self.m1 * self.n1, self.m2 * self.n2)

    @property
    def term_params(self) -> int:
        return self.m1 * self.n1 + self.m2 * self.n2

    def __str__(self) -> str:
        return f"{self.m1}x{self.n1},{self.m2}x{self.n2}"


def parse_kronecker_shape(text: str) -> KroneckerShape:
    """``"m1xn1,m2xn2"`` (the shapes of ``A`` and ``B``)."""
    try:
        a, b = text.split(",")
        m1, n1 = (int(v) for v in a.lower().split("x"))
        m2, n2 = (int(v) for v in b.lower().split("x"))
    except ValueError:
        raise ValueError(f"factors must be 'auto' or 'm1xn1,m2xn2' (e.g. 16x24,24x16), got {text!r}") from None
    return KroneckerShape(m1, n1, m2, n2)


def kronecker_params(shape: KroneckerShape, terms: int) -> int:
    return terms * shape.term_params


def kronecker_saves(shape: KroneckerShape, terms: int) -> bool:
    return kronecker_params(shape, terms) < shape.k * shape.n


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_kronecker_shapes(k: int, n: int, limit: int = 4, max_macs: float | None = None) -> list[KroneckerShape]:
    """Up to ``limit`` factor shapes for ``W [K, N]``, the most parameter-efficient first.

    A shape can save the most when ``m1 n1`` and ``m2 n2`` are close to ``sqrt(K N)`` (one term
    then costs the least). Among shapes equally balanced, with ``max_macs`` those that allow the
    most terms come first (the lowering costs ``r (1/n2 + 1/m1)`` dense multiply-adds, see
    :func:`tforge.passes.kronecker.macs_ratio`), then those with the squarest factors. Factors
    with a dimension of 1 are excluded: with ``n1 = m2 = 1`` a sum of Kronecker products is a
    low-rank product, which ``svd`` does better, and the other cases are block structures.
    """
    if k < 1 or n < 1 or limit < 1:
        raise ValueError(f"auto_kronecker_shapes: need K, N, limit >= 1, got {k}, {n}, {limit}")
    candidates = []
    for m1 in _divisors(k):
        for n1 in _divisors(n):
            shape = KroneckerShape(m1, n1, k // m1, n // n1)
            if min(shape.m1, shape.n1, shape.m2, shape.n2) < 2:
                continue  # n1 = m2 = 1 is a low-rank factorization (svd's job); others block shapes
            balance = abs(math.log(shape.m1 * shape.n1) - math.log(shape.m2 * shape.n2))
            allowed = shape.max_terms
            if max_macs is not None:
                allowed = min(allowed, int(max_macs * shape.m1 * shape.n2 / (shape.m1 + shape.n2)))
            aspect = abs(math.log(shape.m1 / shape.n1)) + abs(math.log(shape.m2 / shape.n2))
            candidates.append((round(balance, 9), -allowed, round(aspect, 9), shape.m1, shape.n1, shape))
    candidates.sort(key=lambda c: c[:5])
    return [c[-1] for c in candidates[:limit]]


def rearrange(weight: np.ndarray, shape: KroneckerShape) -> np.ndarray:
    """``R(W)`` ``[m1 n1, m2 n2]`` with ``R[i1 n1 + j1, i2 n2 + j2] = W[i1 m2 + i2, j1 n2 + j2]``."""
    w = np.asarray(weight)
    if w.shape != (shape.k, shape.n):
        raise ValueError(f"rearrange: weight {w.shape} does not match factors {shape}")
    blocks = w.reshape(shape.m1, shape.m2, shape.n1, shape.n2)
    return blocks.transpose(0, 2, 1, 3).reshape(shape.m1 * shape.n1, shape.m2 * shape.n2)


def kronecker_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_i a[i] (x) b[i]`` for ``a [r, m1, n1]``, ``b [r, m2, n2]``: shape ``[m1 m2, n1 n2]``."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"kronecker_sum: expected [r, m1, n1] and [r, m2, n2], got {a.shape}, {b.shape}")
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return np.einsum("rac,rbd->abcd", a, b).reshape(m1 * m2, n1 * n2)


def nearest_kronecker_psd(
    second_moment: np.ndarray, m1: int, m2: int, *, ridge: float = DEFAULT_RIDGE, iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """``S1 [m1, m1]``, ``S2 [m2, m2]`` positive definite with ``S1 (x) S2`` nearest to ``S``.

    The rank-one truncation of ``R(S)`` (Van Loan and Pitsianis), found by power iteration from
    ``S2 = I``: only the leading singular pair is needed. For a symmetric positive
    semi-definite ``S`` the factors are symmetric and semi-definite up to a common sign, which is
    fixed here. Eigenvalues are floored at ``ridge`` times their mean so both factor as Cholesky.
    """
    s = np.asarray(second_moment, dtype=np.float64)
    if s.shape != (m1 * m2, m1 * m2):
        raise ValueError(f"nearest_kronecker_psd: S {s.shape} does not split as {m1} x {m2}")
    r = rearrange((s + s.T) / 2.0, KroneckerShape(m1, m1, m2, m2))
    v = np.eye(m2).reshape(-1) / math.sqrt(m2)
    u = r @ v
    for _ in range(iterations):
        u = r @ v
        u /= max(float(np.linalg.norm(u)), 1e-300)
        new = r.T @ u
        sigma = float(np.linalg.norm(new))
        new /= max(sigma, 1e-300)
        converged = float(np.abs(new - v).max()) < 1e-10
        v = new
        if converged:
            break
    sigma = float(u @ r @ v)
    s1 = (u * math.sqrt(abs(sigma))).reshape(m1, m1)
    s2 = (v * math.sqrt(abs(sigma))).reshape(m2, m2)
    if np.trace(s1) < 0:
        s1 = -s1
    if np.trace(s2) < 0:
        s2 = -s2
    out = []
    for f in (s1, s2):
        f = (f + f.T) / 2.0
        vals, vecs = np.linalg.eigh(f)
        floor = ridge * max(float(np.mean(np.abs(vals))), 1e-300)
        out.append((vecs * np.maximum(vals, floor)) @ vecs.T)
    return out[0], out[1]


def kronecker_whitening(
    second_moment: np.ndarray, m1: int, m2: int, *, ridge: float = DEFAULT_RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors ``L1``, ``L2`` of the nearest Kronecker product ``S1 (x) S2`` to ``S``."""
    s1, s2 = nearest_kronecker_psd(second_moment, m1, m2, ridge=ridge)
    return whitening_factor(s1, ridge)[0], whitening_factor(s2, ridge)[0]


@dataclasses.dataclass(frozen=True)
class KroneckerSpectrum:
    """The SVD of ``R(W)`` (whitened by ``L1 (x) L2`` for the activation-aware version).

    ``tail[r]`` is the squared Frobenius error of keeping ``r`` terms in the space the SVD was
    taken in: the weight's for plain, the output error under ``S1 (x) S2`` when whitened.
    """

    shape: KroneckerShape
    method: Method
    u: np.ndarray  # [m1 n1, p]
    singular: np.ndarray  # [p]
    vt: np.ndarray  # [p, m2 n2]
    tail: np.ndarray  # [p + 1]
    energy: float  # total, in the same space
    unwhiten: tuple[np.ndarray, np.ndarray] | None  # (L1^-T, L2^-T)

    @property
    def max_terms(self) -> int:
        return int(self.singular.shape[0])

    def factors(self, terms: int) -> tuple[np.ndarray, np.ndarray]:
        """``A [r, m1, n1]`` and ``B [r, m2, n2]`` with ``W ~ sum_i A_i (x) B_i``."""
        if not 1 <= terms <= self.max_terms:
            raise ValueError(f"terms must be in [1, {self.max_terms}], got {terms}")
        return self._terms(0, terms)

    def relative_error(self, terms: int) -> float:
        """Error of keeping ``terms`` terms, in the space the SVD was taken in (see the class)."""
        if not 0 <= terms <= self.max_terms:
            raise ValueError(f"terms must be in [0, {self.max_terms}], got {terms}")
        return float(self.tail[terms] / self.energy) if self.energy > 0 else 0.0

    def measured_relative_errors(
        self, weight: np.ndarray, second_moment: np.ndarray, terms: Sequence[int]
    ) -> np.ndarray:
        """``E||x W - x W_t||^2 / E||x W||^2`` under the measured ``S`` for each ``t`` in ``terms``.

        Exact (no Kronecker approximation of ``S``); costs one ``[K, K] @ [K, N]`` product per
        entry, so callers evaluate a few term counts and interpolate.
        """
        w = _as_weight(weight)
        s = _as_moment(second_moment, w.shape[0])
        if s is None:
            raise ValueError("measured_relative_errors: needs the second moment")
        energy = output_energy(w, s)
        order = sorted(set(int(t) for t in terms))
        if order and not 0 <= order[0] <= order[-1] <= self.max_terms:
            raise ValueError(f"terms must be in [0, {self.max_terms}], got {order}")
        approx = np.zeros_like(w)
        done = 0
        found: dict[int, float] = {}
        for t in order:
            if t > done:
                a, b = self._terms(done, t)
                approx += kronecker_sum(a, b)
                done = t
            found[t] = output_energy(w - approx, s) / energy if energy > 0 else 0.0
        return np.array([found[int(t)] for t in terms])

    def _terms(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Unwhitened factors of terms ``start .. stop - 1``."""
        sh = self.shape
        count = stop - start
        root = np.sqrt(self.singular[start:stop])
        a = (self.u[:, start:stop] * root).T.reshape(count, sh.m1, sh.n1)
        b = (root[:, None] * self.vt[start:stop]).reshape(count, sh.m2, sh.n2)
        if self.unwhiten is not None:
            inv1, inv2 = self.unwhiten
            a = np.einsum("ij,rjn->rin", inv1, a)
            b = np.einsum("ij,rjn->rin", inv2, b)
        return a, b


def kronecker_spectrum(
    weight: np.ndarray,
    shape: KroneckerShape,
    method: Method = "plain",
    second_moment: np.ndarray | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
    whitening: tuple[np.ndarray, np.ndarray] | None = None,
) -> KroneckerSpectrum:
    """Van Loan-Pitsianis decomposition of ``weight`` for ``shape`` (see the module docstring).

    ``method="activation"`` whitens by :func:`kronecker_whitening` of ``second_moment``, or by
    ``whitening`` (``L1``, ``L2``) when given (one input read by several weights needs it once).
    """
    w = _as_weight(weight)
    if w.shape != (shape.k, shape.n):
        raise ValueError(f"kronecker_spectrum: weight {w.shape} does not match factors {shape}")
    unwhiten = None
    if method == "activation":
        if whitening is None:
            s = _as_moment(second_moment, shape.k)
            if s is None or s.ndim != 2:
                raise ValueError("activation-aware Kronecker factors need the [K, K] second moment")
            whitening = kronecker_whitening(s, shape.m1, shape.m2, ridge=ridge)
        l1, l2 = whitening
        if l1.shape != (shape.m1, shape.m1) or l2.shape != (shape.m2, shape.m2):
            raise ValueError(f"kronecker_spectrum: whitening {l1.shape}, {l2.shape} does not match {shape}")
        blocks = w.reshape(shape.m1, shape.m2, shape.n)
        w = np.einsum("ia,jb,ijn->abn", l1, l2, blocks).reshape(shape.k, shape.n)  # (L1 (x) L2)^T W
        unwhiten = (np.linalg.inv(l1.T), np.linalg.inv(l2.T))
    elif method != "plain":
        raise ValueError(f"method must be 'plain' or 'activation', got {method!r}")
    u, sv, vt = np.linalg.svd(rearrange(w, shape), full_matrices=False)
    sq = sv**2
    tail = np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])
    return KroneckerSpectrum(shape, method, u, sv, vt, tail, float(sq.sum()), unwhiten)
