"""Linear attention math (tforge.passes.math.linear_attention) and the Hedgehog fit."""

from __future__ import annotations

import numpy as np
import pytest

from tforge.passes.math import linear_attention as la


def _qkv(rng: np.random.Generator, b: int = 2, h: int = 3, n: int = 13, d: int = 4):
    return (rng.normal(size=(b, h, n, d)) for _ in range(3))


def _padding(b: int, n: int) -> np.ndarray:
    mask = np.ones((b, n), dtype=np.int64)
    mask[-1, n - n // 3 :] = 0
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_constant_feature_map_is_uniform_softmax_attention(
    rng: np.random.Generator, causal: bool
) -> None:
    # phi = 1 makes every visible key weigh the same, which is softmax attention with q = 0
    q, k, v = _qkv(rng)
    mask = _padding(2, 13)
    ones = np.ones_like(q)
    out = la.linear_attention(ones, ones, v, causal=causal, key_mask=mask, eps=0.0)
    expected = la.softmax_attention(np.zeros_like(q), k, v, scale=1.0, causal=causal, key_mask=mask)
    # numpy reference of the uniform average, written out
    allowed = np.tril(np.ones((13, 13))) if causal else np.ones((13, 13))
    allowed = allowed[None, None] * (mask != 0)[:, None, None, :]
    manual = (allowed @ v) / allowed.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, manual, atol=1e-12)
    np.testing.assert_allclose(expected, manual, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_causal_equals_unchunked(rng: np.random.Generator, chunk: int) -> None:
    q, k, v = _qkv(rng)
    phi_q, phi_k = la.elu_features(q), la.elu_features(k)
    mask = _padding(2, 13)
    full = la.linear_attention(phi_q, phi_k, v, causal=True, key_mask=mask)
    chunked = la.chunked_causal(phi_q, phi_k, v, chunk, key_mask=mask)
    np.testing.assert_allclose(chunked, full, atol=1e-5, rtol=0)


def test_weights_are_normalised_and_causal(rng: np.random.Generator) -> None:
    q, k, _ = _qkv(rng)
    w = la.linear_weights(la.elu_features(q), la.elu_features(k), causal=True, eps=0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.triu(w[0, 0], 1) == 0)
    p = la.softmax_weights(q, k, scale=0.5, causal=True)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.triu(p[0, 0], 1) == 0)


def test_feature_maps(rng: np.random.Generator) -> None:
    x = rng.normal(size=(1, 2, 5, 4))
    assert np.all(la.elu_features(x) > 0)
    np.testing.assert_allclose(
        la.elu_features(np.array([-1.0, 0.0, 2.0])), [np.exp(-1.0), 1.0, 3.0]
    )
    assert np.all(la.relu_features(x) >= 0)
    w, b = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 3))
    phi = la.hedgehog_features(x, w, b)
    assert phi.shape == (1, 2, 5, 6)
    np.testing.assert_allclose(phi[..., :3].sum(-1), 1.0)
    np.testing.assert_allclose(phi[..., 3:].sum(-1), 1.0)
    with pytest.raises(ValueError, match="unknown feature map"):
        la.apply_feature_map("tanh", x)


def test_relative_error() -> None:
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    assert la.relative_error(ref, ref) == 0.0
    assert la.relative_error(ref, 0 * ref) == pytest.approx(1.0)
    assert la.relative_error(ref, ref + [[0, 0], [1, 0]], rows=np.array([True, False])) == 0.0


def test_hedgehog_fit_lowers_the_loss_deterministically(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    from tforge.passes.math.feature_map_fit import FitSample, fit_hedgehog

    q, k, _ = _qkv(rng, b=2, h=2, n=16, d=4)
    q, k = 2 * q, 2 * k  # peaked softmax weights: elu+1 cannot follow them
    mask = _padding(2, 16)
    p = la.softmax_weights(q, k, scale=1.0, causal=True, key_mask=mask)
    samples = [FitSample(q, k, p, mask)]
    fit = fit_hedgehog(samples, causal=True, features=4, steps=30, seconds=30.0, seed=3)
    again = fit_hedgehog(samples, causal=True, features=4, steps=30, seconds=30.0, seed=3)
    assert fit.steps == 30 and fit.loss_end < fit.loss_start
    np.testing.assert_array_equal(fit.wq, again.wq)

    def cross_entropy(phi_q: np.ndarray, phi_k: np.ndarray) -> float:
        a = la.linear_weights(phi_q, phi_k, causal=True, key_mask=mask, eps=1e-12)
        rows = (mask != 0)[:, None, :].repeat(2, axis=1)
        return float(-(p * np.log(a + 1e-12)).sum(-1)[rows].mean())

    fitted = cross_entropy(
        la.hedgehog_features(q, fit.wq, fit.bq), la.hedgehog_features(k, fit.wk, fit.bk)
    )
    assert fitted == pytest.approx(fit.loss_end, rel=1e-3)
    assert fitted < cross_entropy(la.elu_features(q), la.elu_features(k))
