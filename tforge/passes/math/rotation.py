"""Orthogonal rotations of a residual stream: Hadamard matrices and random orthogonal ones.

``rotate-residual`` multiplies a decoder's residual stream by an orthogonal ``Q`` and folds
``Q`` into every weight that writes or reads the stream (QuaRot, Ashkboos et al. 2024;
SpinQuant, Liu et al. 2024). In float nothing changes; the weights that read the rotated
stream are ``Q^T W``, whose rows mix every input channel, so a few channels with large
weights (the outliers a 4-bit block grid cannot hold) are spread over all of them.

A scaled Hadamard matrix with random signs, ``diag(s) H / sqrt(n)``, spreads best (every entry
the same magnitude). ``H`` (``H H^T = n I``, entries +-1) exists only for some orders; these are
built from Sylvester's doubling (powers of two) and Paley's two constructions (order ``q + 1``
for a prime ``q = 3 mod 4``, order ``2 (q + 1)`` for a prime ``q = 1 mod 4``), multiplied by
Kronecker products (the largest Paley order first): 576 = 72 x 8, 768 = 384 x 2, 896 = 224 x 4,
960 = 480 x 2. Where
none of those covers ``n``, :func:`random_orthogonal` (QR of a Gaussian matrix) is the fallback.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["hadamard", "random_hadamard", "random_orthogonal", "rotation"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character of the prime field of order q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley_one(q: int) -> np.ndarray:
    """Paley I: a Hadamard matrix of order q + 1, q a prime with q = 3 (mod 4)."""
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def _paley_two(q: int) -> np.ndarray:
    """Paley II: a Hadamard matrix of order 2 (q + 1), q a prime with q = 1 (mod 4)."""
    c = np.zeros((q + 1, q + 1), np.int64)  # the symmetric conference matrix
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = np.array([[1, 1], [1, -1]], np.int64)
    zero = np.array([[1, -1], [-1, -1]], np.int64)
    return np.kron(c, plus) + np.kron(np.eye(q + 1, dtype=np.int64), zero)


@functools.cache
def _paley_orders(limit: int) -> dict[int, tuple[str, int]]:
    """Every Paley order up to ``limit``: order -> (construction, q)."""
    orders: dict[int, tuple[str, int]] = {}
    for q in range(3, limit):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= limit:
            orders.setdefault(q + 1, ("one", q))
        if q % 4 == 1 and 2 * (q + 1) <= limit:
            orders.setdefault(2 * (q + 1), ("two", q))
    return orders


@functools.cache
def _factors(n: int) -> tuple[int, ...] | None:
    """Hadamard orders whose Kronecker product is n (a power of two last), or None."""
    if n >= 1 and n & (n - 1) == 0:
        return (n,)
    for order in sorted(_paley_orders(n), reverse=True):
        if n % order == 0:
            rest = _factors(n // order)
            if rest is not None:
                return (order, *rest)
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order ``n`` (int64 entries +-1, ``H H^T = n I``), or None when the
    constructions here do not reach ``n``."""
    factors = _factors(n)
    if factors is None:
        return None
    h = np.ones((1, 1), np.int64)
    for order in factors:
        if order & (order - 1) == 0:
            part = np.ones((1, 1), np.int64)
            while part.shape[0] < order:
                part = np.block([[part, part], [part, -part]])
        else:
            kind, q = _paley_orders(order)[order]
            part = _paley_one(q) if kind == "one" else _paley_two(q)
        h = np.kron(h, part)
    return h


def random_hadamard(n: int, seed: int = 0) -> np.ndarray | None:
    """``diag(s) H / sqrt(n)`` with random signs ``s``: orthogonal, float64; None if no ``H``."""
    h = hadamard(n)
    if h is None:
        return None
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], n)
    return signs[:, None] * h / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, the signs of R's diagonal fixed), float64."""
    a = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None, :]


def rotation(n: int, kind: str = "hadamard", seed: int = 0) -> tuple[np.ndarray, str]:
    """The rotation ``kind`` (``hadamard`` or ``random``) of order ``n`` and what it is: a
    Hadamard kind falls back to a random orthogonal matrix where no Hadamard matrix is built."""
    if kind == "hadamard":
        q = random_hadamard(n, seed)
        if q is not None:
            parts = [str(f) for f in _factors(n) or () if f > 1]
            return q, f"random-sign Hadamard of order {n} ({' x '.join(parts)})"
        return random_orthogonal(n, seed), f"random orthogonal (no Hadamard matrix of order {n} is built here)"
    if kind == "random":
        return random_orthogonal(n, seed), "random orthogonal"
    raise ValueError(f"rotation: kind must be 'hadamard' or 'random', got {kind!r}")
