"""k-means codebooks: find well-separated clusters, are reproducible, and assign to the nearest codeword."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqcompress.codebook import assign, kmeans, kmeans_pp_seed


def clusters(k: int, d: int, per: int, seed: int, spread: float = 10.0, sigma: float = 0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    while True:  # keep the clusters well separated
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(k) * 1e9
        if gaps.min() > 2.0:
            break
        centres = rng.normal(size=(k, d)) * spread
    points = centres.repeat(per, 0) + rng.normal(size=(k * per, d)) * sigma
    return centres.astype(np.float32), rng.permutation(points).astype(np.float32)


@pytest.mark.parametrize("k, d, seed", [(8, 4, 0), (16, 2, 1), (5, 8, 2)])
def test_recovers_separated_clusters(k, d, seed):
    centres, points = clusters(k, d, 100, seed)
    centroids = kmeans(points, k, seed=0)
    assert centroids.shape == (k, d) and centroids.dtype == np.float32
    distance = np.linalg.norm(centres[:, None] - centroids[None], axis=-1)
    assert distance.min(1).max() < 0.05  # every true centre has a centroid on top of it
    assert sorted(distance.argmin(1).tolist()) == list(range(k))  # one centroid per centre


def test_recovers_clusters_from_a_subsample():
    centres, points = clusters(8, 4, 400, 3)
    centroids = kmeans(points, 8, seed=0, max_points_per_centroid=32)  # 3200 points, trained on 256
    distance = np.linalg.norm(centres[:, None] - centroids[None], axis=-1)
    assert distance.min(1).max() < 0.1


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_same_centroids(threads):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:  # large enough (70,000 points × 64 centroids) that faiss really uses the threads
        points = np.random.default_rng(0).normal(size=(70_000, 4)).astype(np.float32)
        a = kmeans(points, 64, seed=7, iterations=5, max_points_per_centroid=1100)
        b = kmeans(points, 64, seed=7, iterations=5, max_points_per_centroid=1100)
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(a, b)
    assert len(np.unique(a, axis=0)) == 64  # no collapsed codewords on continuous data


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31))
def test_assign_is_nearest(n, k, d, seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, d)).astype(np.float32)
    centroids = rng.normal(size=(k, d)).astype(np.float32)
    nearest = assign(points, centroids)
    assert nearest.shape == (n,)
    assert ((0 <= nearest) & (nearest < k)).all()
    distance = ((points[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    chosen = distance[np.arange(n), nearest]
    np.testing.assert_allclose(chosen, distance.min(1), rtol=1e-4, atol=1e-5)
    ordered = np.sort(distance, 1)
    clear = ordered[:, 0] + 1e-3 < (ordered[:, 1] if k > 1 else np.inf)  # no float near-tie
    assert (nearest[clear] == distance.argmin(1)[clear]).all()


def test_kmeans_pp_seed_picks_distinct_points():
    centres, points = clusters(6, 3, 50, 4)
    seeds = kmeans_pp_seed(points, 6, np.random.default_rng(0))
    # every seed is a data point, and with separated clusters k-means++ lands one in each cluster
    assert all((points == s).all(1).any() for s in seeds)
    owner = np.linalg.norm(seeds[:, None] - centres[None], axis=-1).argmin(1)
    assert sorted(owner.tolist()) == list(range(6))


def test_the_largest_values_are_found_chunk_by_chunk():
    from vqcompress.codebook import _largest

    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    for k in (1, 7, 300):
        found = _largest(lambda start, stop: values[start:stop], len(values), k, chunk=256)
        assert sorted(found.tolist()) == sorted(np.argsort(-values)[:k].tolist())
