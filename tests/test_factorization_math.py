"""Low-rank and Kronecker factors (tforge/passes/math/factorization.py), in NumPy alone."""

from __future__ import annotations

import numpy as np
import pytest

from tforge.passes.math import factorization as fz


def _correlated_inputs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Inputs with strongly unequal, correlated channels (what real activations look like)."""
    mixing = rng.normal(size=(k, k)) * rng.uniform(0.05, 3.0, size=k)[:, None]
    return rng.normal(size=(rows, k)) @ mixing


def _measured_error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.mean(np.sum((x @ w - x @ approx) ** 2, axis=1)))


# ----------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_exact_rank_r_weight_is_recovered(method: str, rng: np.random.Generator) -> None:
    w = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 24))
    x = _correlated_inputs(rng, 500, 40)

    spectrum = fz.low_rank_spectrum(w, method, x.T @ x / len(x))
    a, b = spectrum.factors(5)

    assert a.shape == (40, 5) and b.shape == (5, 24)
    np.testing.assert_allclose(a @ b, w, atol=1e-9 * np.abs(w).max())
    assert spectrum.relative_error(5) < 1e-18


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_full_rank_reproduces_outputs(method: str, rng: np.random.Generator) -> None:
    w = rng.normal(size=(32, 48))
    x = _correlated_inputs(rng, 300, 32)

    a, b = fz.low_rank_spectrum(w, method, x.T @ x / len(x)).factors(32)

    reference = x @ w
    assert np.abs((x @ a) @ b - reference).max() <= 1e-4 * np.abs(reference).max()


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_predicted_error_is_the_measured_output_error(method: str, rng: np.random.Generator) -> None:
    w = rng.normal(size=(24, 16))
    x = _correlated_inputs(rng, 2000, 24)
    s = x.T @ x / len(x)

    spectrum = fz.low_rank_spectrum(w, method, s)

    for rank in (1, 4, 9):
        a, b = spectrum.factors(rank)
        measured = _measured_error(x, w, a @ b)
        assert spectrum.error(rank) == pytest.approx(measured, rel=1e-9)
        assert fz.output_error(w, a @ b, s) == pytest.approx(measured, rel=1e-9)
    assert spectrum.energy == pytest.approx(float(np.mean(np.sum((x @ w) ** 2, axis=1))), rel=1e-9)


def test_activation_aware_beats_plain_at_equal_rank_on_correlated_inputs(rng: np.random.Generator) -> None:
    w = rng.normal(size=(48, 40))
    x = _correlated_inputs(rng, 4000, 48)
    train, test = x[:2000], x[2000:]
    s = train.T @ train / len(train)

    for rank in (4, 8, 16):
        plain = fz.low_rank_spectrum(w, "plain", s).factors(rank)
        aware = fz.low_rank_spectrum(w, "activation", s).factors(rank)
        # measured on inputs the second moment was not computed from
        plain_error = _measured_error(test, w, plain[0] @ plain[1])
        aware_error = _measured_error(test, w, aware[0] @ aware[1])
        assert aware_error < 0.8 * plain_error, (rank, aware_error, plain_error)


def test_without_statistics_errors_are_frobenius(rng: np.random.Generator) -> None:
    w = rng.normal(size=(12, 20))
    spectrum = fz.low_rank_spectrum(w)
    a, b = spectrum.factors(3)
    assert not spectrum.weighted
    assert spectrum.error(3) == pytest.approx(float(np.sum((w - a @ b) ** 2)), rel=1e-9)
    assert spectrum.energy == pytest.approx(float(np.sum(w**2)))


def test_diagonal_second_moment_weights_the_errors(rng: np.random.Generator) -> None:
    w = rng.normal(size=(10, 6))
    d = rng.uniform(0.1, 5.0, size=10)
    spectrum = fz.low_rank_spectrum(w, "plain", d)
    a, b = spectrum.factors(2)
    assert spectrum.error(2) == pytest.approx(fz.output_error(w, a @ b, np.diag(d)), rel=1e-9)


def test_rank_for_energy_is_the_smallest_rank_that_keeps_it(rng: np.random.Generator) -> None:
    w = rng.normal(size=(16, 16)) * np.logspace(0, -3, 16)[None, :]
    spectrum = fz.low_rank_spectrum(w)
    rank = spectrum.rank_for_energy(0.99)
    assert spectrum.relative_error(rank) <= 0.01
    assert spectrum.relative_error(rank - 1) > 0.01


def test_max_saving_rank_is_the_break_even_point() -> None:
    assert fz.max_saving_rank(8, 8) == 3  # 4 * (8 + 8) = 64 is not fewer than 8 * 8
    assert fz.max_saving_rank(384, 1536) == 307  # 1536 * 384 / 1920 = 307.2
    for k, n in [(5, 7), (64, 64), (576, 192)]:
        r = fz.max_saving_rank(k, n)
        assert fz.low_rank_params(k, n, r) < k * n <= fz.low_rank_params(k, n, r + 1)


def test_whitening_factor_adds_a_ridge_to_singular_moments() -> None:
    s = np.zeros((3, 3))
    s[0, 0] = 2.0
    lower, lam = fz.whitening_factor(s, 1e-3)
    np.testing.assert_allclose(lower @ lower.T, s + lam * np.eye(3), atol=1e-12)
    assert lam == pytest.approx(1e-3 * 2.0 / 3.0)


def test_bad_inputs_are_rejected(rng: np.random.Generator) -> None:
    w = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match="second moment"):
        fz.low_rank_spectrum(w, "activation")
    with pytest.raises(ValueError, match="shape"):
        fz.low_rank_spectrum(w, "plain", np.eye(5))
    with pytest.raises(ValueError, match="rank must be"):
        fz.low_rank_spectrum(w).factors(4)
    with pytest.raises(ValueError, match="NaN"):
        fz.low_rank_spectrum(np.full((2, 2), np.nan))


# ----------------------------------------------------------------------------- budget


def test_budget_goes_where_error_per_parameter_is_least() -> None:
    cheap = [(0, 0.0), (10, 0.1), (20, 0.3)]
    dear = [(0, 0.0), (10, 1.0), (20, 2.0)]
    assert fz.allocate_budget([dear, cheap], 10) == [0, 1]
    assert fz.allocate_budget([dear, cheap], 20) == [0, 2]
    assert fz.allocate_budget([dear, cheap], 30) == [1, 2]
    assert fz.allocate_budget([dear, cheap], 0) == [0, 0]
    assert fz.allocate_budget([dear, cheap], 1000) == [2, 2]  # as far as the options go


def test_budget_follows_the_convex_hull_past_an_expensive_first_step() -> None:
    # near the break-even rank a factorization removes few parameters for a visible error:
    # the hull jumps over that step to the efficient one
    # (taking steps in order would remove 60 + 10 + 100 parameters for an error of 1.1)
    layer = [(0, 0.0), (10, 0.5), (100, 0.6)]
    other = [(0, 0.0), (60, 0.5)]
    assert fz.allocate_budget([layer, other], 100) == [2, 0]


def test_budget_crossing_step_adds_the_least_error() -> None:
    a = [(0, 0.0), (100, 1.0)]  # slope 0.01 but a large step
    b = [(0, 0.0), (12, 0.3)]  # slope 0.025, enough to reach 10
    assert fz.allocate_budget([a, b], 10) == [0, 1]


def test_budget_needs_a_leave_alone_option() -> None:
    with pytest.raises(ValueError, match="option 0"):
        fz.allocate_budget([[(5, 0.1)]], 3)


# ----------------------------------------------------------------------------- Kronecker


def test_kronecker_sum_is_numpys_kron(rng: np.random.Generator) -> None:
    a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 2))
    expected = np.kron(a[0], b[0]) + np.kron(a[1], b[1])
    np.testing.assert_allclose(fz.kronecker_sum(a, b), expected, atol=1e-12)


def test_rearrangement_turns_a_kronecker_product_into_rank_one(rng: np.random.Generator) -> None:
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(5, 2))
    r = fz.rearrange(np.kron(a, b), fz.KroneckerShape(3, 4, 5, 2))
    np.testing.assert_allclose(r, np.outer(a.reshape(-1), b.reshape(-1)), atol=1e-12)


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_exact_kronecker_sum_is_recovered(method: str, rng: np.random.Generator) -> None:
    shape = fz.KroneckerShape(6, 4, 8, 8)
    w = fz.kronecker_sum(rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 8, 8)))
    x = _correlated_inputs(rng, 400, 48)

    spectrum = fz.kronecker_spectrum(w, shape, method, x.T @ x / len(x))
    a, b = spectrum.factors(3)

    assert a.shape == (3, 6, 4) and b.shape == (3, 8, 8)
    np.testing.assert_allclose(fz.kronecker_sum(a, b), w, atol=1e-9 * np.abs(w).max())
    assert spectrum.relative_error(3) < 1e-18 and spectrum.relative_error(2) > 1e-3


def test_all_terms_reproduce_outputs(rng: np.random.Generator) -> None:
    shape = fz.KroneckerShape(4, 6, 3, 2)
    w = rng.normal(size=(12, 12))
    x = rng.normal(size=(50, 12))
    spectrum = fz.kronecker_spectrum(w, shape)
    a, b = spectrum.factors(spectrum.max_terms)
    assert spectrum.max_terms == 6
    assert np.abs(x @ fz.kronecker_sum(a, b) - x @ w).max() <= 1e-4 * np.abs(x @ w).max()


def test_plain_kronecker_error_is_the_frobenius_tail(rng: np.random.Generator) -> None:
    shape = fz.KroneckerShape(4, 4, 4, 4)
    w = rng.normal(size=(16, 16))
    spectrum = fz.kronecker_spectrum(w, shape)
    for terms in (1, 5):
        a, b = spectrum.factors(terms)
        measured = float(np.sum((w - fz.kronecker_sum(a, b)) ** 2)) / float(np.sum(w**2))
        assert spectrum.relative_error(terms) == pytest.approx(measured, rel=1e-9)


def test_nearest_kronecker_factors_of_a_kronecker_moment_are_exact(rng: np.random.Generator) -> None:
    g1, g2 = rng.normal(size=(4, 4)), rng.normal(size=(6, 6))
    s = np.kron(g1 @ g1.T, g2 @ g2.T)
    s1, s2 = fz.nearest_kronecker_psd(s, 4, 6)
    np.testing.assert_allclose(np.kron(s1, s2), s, atol=1e-9 * np.abs(s).max())
    assert np.linalg.eigvalsh(s1).min() > 0 and np.linalg.eigvalsh(s2).min() > 0


def test_activation_aware_kronecker_beats_plain_on_kronecker_structured_inputs(
    rng: np.random.Generator,
) -> None:
    # inputs whose channel groups are independent: E[x x^T] = S1 (x) S2 up to sampling
    m1, m2 = 6, 8
    c1 = rng.normal(size=(m1, m1)) * rng.uniform(0.1, 3.0, m1)[:, None]
    c2 = rng.normal(size=(m2, m2)) * rng.uniform(0.1, 3.0, m2)[:, None]
    x = np.einsum("nij,ia,jb->nab", rng.normal(size=(6000, m1, m2)), c1, c2).reshape(6000, m1 * m2)
    train, test = x[:3000], x[3000:]
    s = train.T @ train / len(train)
    w = rng.normal(size=(48, 36))
    shape = fz.KroneckerShape(m1, 6, m2, 6)

    for terms in (2, 6):
        plain = fz.kronecker_spectrum(w, shape, "plain").factors(terms)
        aware = fz.kronecker_spectrum(w, shape, "activation", s).factors(terms)
        plain_error = _measured_error(test, w, fz.kronecker_sum(*plain))
        aware_error = _measured_error(test, w, fz.kronecker_sum(*aware))
        assert aware_error < 0.8 * plain_error, (terms, aware_error, plain_error)


def test_auto_shapes_divide_the_weight_and_are_balanced_first() -> None:
    shapes = fz.auto_kronecker_shapes(384, 1536, limit=3)
    assert len(shapes) == 3
    for shape in shapes:
        assert (shape.k, shape.n) == (384, 1536)
        assert min(shape.m1, shape.n1, shape.m2, shape.n2) >= 2
    first = shapes[0]
    assert first.m1 * first.n1 == first.m2 * first.n2 == 768  # sqrt(384 * 1536)
    assert fz.kronecker_params(first, 1) == 1536
    # a bound on multiply-adds favours shapes that allow more terms under it
    bounded = fz.auto_kronecker_shapes(384, 384, limit=1, max_macs=1.0)[0]
    assert str(bounded) == "192x2,2x192"


def test_kronecker_shape_text() -> None:
    shape = fz.parse_kronecker_shape("16x24,24x16")
    assert (shape.m1, shape.n1, shape.m2, shape.n2) == (16, 24, 24, 16) and str(shape) == "16x24,24x16"
    assert not fz.kronecker_saves(fz.KroneckerShape(2, 2, 2, 2), 2) and fz.kronecker_saves(shape, 100)
    for bad in ("16x24", "16x24,24", "axb,2x2", "0x2,2x2"):
        with pytest.raises(ValueError):
            fz.parse_kronecker_shape(bad)


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_measured_kronecker_errors_use_the_full_second_moment(method: str, rng: np.random.Generator) -> None:
    shape = fz.KroneckerShape(4, 4, 6, 3)
    w = rng.normal(size=(24, 12))
    x = _correlated_inputs(rng, 800, 24)
    s = x.T @ x / len(x)
    spectrum = fz.kronecker_spectrum(w, shape, method, s)

    measured = spectrum.measured_relative_errors(w, s, [5, 1, 16])

    for terms, value in zip([5, 1, 16], measured, strict=True):
        approx = fz.kronecker_sum(*spectrum.factors(terms))
        assert value == pytest.approx(_measured_error(x, w, approx) / _measured_error(x, w, 0 * w), rel=1e-9)
    assert measured[2] < 1e-18  # all 16 terms
