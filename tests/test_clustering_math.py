"""RPTQ clustering math: k-means, canonical labels, permutations, per-cluster quantization."""

from __future__ import annotations

import numpy as np
import pytest

from tforge.passes.math import clustering


def _ranges(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """48 channels in three range groups: narrow (~1), medium (~8) and outliers (~60)."""
    width = np.concatenate([np.full(30, 1.0), np.full(14, 8.0), np.full(4, 60.0)])
    width = width * rng.uniform(0.8, 1.2, width.shape[0])
    order = rng.permutation(width.shape[0])
    width = width[order]
    return -width * rng.uniform(0.7, 1.0, width.shape[0]), width


def test_kmeans_separates_well_separated_groups_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 20.0]])
    points = np.concatenate([c + rng.normal(scale=0.3, size=(20, 2)) for c in centres])

    labels, found = clustering.kmeans(points, 3, seed=5)

    for g in range(3):  # every true group falls in one cluster, and clusters differ
        assert len(set(labels[20 * g : 20 * (g + 1)])) == 1
    assert len(set(labels)) == 3
    again, _ = clustering.kmeans(points, 3, seed=5)
    np.testing.assert_array_equal(labels, again)
    assert found.shape == (3, 2)


def test_kmeans_never_returns_more_clusters_than_distinct_points() -> None:
    labels, centres = clustering.kmeans(np.array([[1.0, 1.0]] * 5 + [[2.0, 2.0]] * 3), 4)
    assert centres.shape[0] == 2 and set(labels) == {0, 1}
    with pytest.raises(ValueError, match="NaN"):
        clustering.kmeans(np.array([[np.nan, 0.0]]), 1)


def test_cluster_labels_are_canonical_and_independent_of_channel_order() -> None:
    rng = np.random.default_rng(1)
    lo, hi = _ranges(rng)

    found = clustering.cluster_channels(lo, hi, 3, seed=0)

    widths = found.centres[:, 1] - found.centres[:, 0]
    assert np.all(np.diff(widths) > 0)  # cluster 0 is the narrowest
    assert np.all(hi[found.labels == 2] > 40)  # the outliers are the widest cluster
    shuffle = rng.permutation(lo.shape[0])
    again = clustering.cluster_channels(lo[shuffle], hi[shuffle], 3, seed=0)
    np.testing.assert_array_equal(again.labels, found.labels[shuffle])


def test_contiguous_permutation_is_a_permutation_that_groups_clusters() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=50)

    perm = clustering.contiguous_permutation(labels)

    assert clustering.is_permutation(perm, 50)
    reordered = labels[perm]
    assert [s[2] for s in clustering.segments(reordered)] == sorted(set(labels.tolist()))
    inv = clustering.inverse_permutation(perm)
    np.testing.assert_array_equal(reordered[inv], labels)
    assert not clustering.is_permutation(np.array([0, 0, 2]), 3)


def test_within_blocks_permutation_keeps_block_boundaries() -> None:
    keys = np.array([2, 0, 1, 0, 1, 1, 0, 2])

    perm = clustering.within_blocks_permutation(keys, 4)

    np.testing.assert_array_equal(perm // 4, np.arange(8) // 4)
    np.testing.assert_array_equal(keys[perm], [0, 0, 1, 2, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="blocks"):
        clustering.within_blocks_permutation(keys, 3)


def test_segments_and_cluster_ranges() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0])
    assert clustering.segments(labels) == [(0, 2, 0), (2, 5, 1), (5, 6, 0)]
    lo, hi = clustering.cluster_ranges(
        np.array([-1.0, -2.0, 1.0, 3.0, 2.0, -0.5]),
        np.array([1.0, 0.5, 4.0, 5.0, 9.0, 0.1]),
        labels,
        2,
    )
    np.testing.assert_allclose(lo, [-2.0, 0.0])  # cluster 1 is all positive: widened to hold 0
    np.testing.assert_allclose(hi, [1.0, 9.0])


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_error_is_half_a_step_inside_the_range(bits: int) -> None:
    rng = np.random.default_rng(3)
    lo, hi = np.array([-1.0, -0.1]), np.array([3.0, 0.2])
    scale, zero = clustering.uint_qparams(lo, hi, bits)
    x = rng.uniform(lo, hi, size=(1000, 2))

    err = np.abs(clustering.fake_quantize(x, scale, zero, bits) - x)

    assert np.all(err <= scale / 2 + 1e-6)
    np.testing.assert_allclose(scale, (hi - lo) / (2**bits - 1), rtol=1e-6)
    # outside the range values clip to the grid's ends
    assert (
        clustering.fake_quantize(np.array([[100.0, 100.0]]), scale, zero, bits)[0, 0]
        <= hi[0] + scale[0]
    )


def test_weight_fake_quantization_8_and_4_bits() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(size=(70, 6))

    w8 = clustering.fake_quantize_weight(w, 8)
    w4 = clustering.fake_quantize_weight(w, 4, block=32)

    assert np.all(np.abs(w8 - w) <= np.abs(w).max(axis=0) / 127 / 2 + 1e-6)
    assert 0 < np.linalg.norm(w4 - w) / np.linalg.norm(w) < 0.15
    # each block of 32 rows has at most 16 distinct values per column
    assert all(len(np.unique(w4[i : i + 32, j])) <= 16 for i in (0, 32, 64) for j in range(6))
    with pytest.raises(ValueError, match="bits"):
        clustering.fake_quantize_weight(w, 3)
