"""k-means codebooks: find well-separated clusters, are reproducible, and assign to the nearest codeword."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqcompress.codebook import assign, kmeans, kmeans_pp_seed


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Tiny k-means problems run ~100× slower on contended cores when OpenMP threads spin."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


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
    faiss.omp_set_num_threads(threads)
    try:
        points = np.random.default_rng(0).normal(size=(3000, 4)).astype(np.float32)
        a = kmeans(points, 32, seed=7, max_points_per_centroid=64)
        b = kmeans(points, 32, seed=7, max_points_per_centroid=64)
    finally:
        faiss.omp_set_num_threads(1)
    assert np.array_equal(a, b)
    assert len(np.unique(a, axis=0)) == 32  # no collapsed codewords on continuous data


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
    assert (nearest == distance.argmin(1)).mean() > 0.95  # exact up to float near-ties


def test_kmeans_pp_seed_picks_distinct_points():
    _, points = clusters(6, 3, 50, 4)
    seeds = kmeans_pp_seed(points, 6, np.random.default_rng(0))
    # every seed is a data point, and with separated clusters k-means++ lands one in each cluster
    assert all((points == s).all(1).any() for s in seeds)
    assert len(np.unique(np.round(seeds), axis=0)) == 6
