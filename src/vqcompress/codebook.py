"""Codebook learning: k-means on faiss, with the details mature engines get right.

k-means++ seeding (on 32 points per centroid: enough to place seeds, cheap), faiss's Lloyd
iterations on a bounded subsample (at most ``max_points_per_centroid`` points per centroid, plus
the k points of largest norm, so outlier weights keep codewords;
faiss splits a populous cluster to refill an empty one), a fixed seed, then exact
nearest-codeword assignment of every point.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import torch

#: Below this many point–centroid distances per iteration, one thread: OpenMP's start-up and
#: spinning cost more than the work, and far more when the cores are shared.
SMALL_FIT = 1 << 22


@contextmanager
def _threads(count: int):
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def kmeans_pp_seed(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability ∝ squared distance to the nearest."""
    centres = np.empty((k, points.shape[1]), dtype=np.float32)
    squared_norms = (points * points).sum(1)

    def squared_distance(centre: np.ndarray) -> np.ndarray:
        return squared_norms - 2 * (points @ centre) + centre @ centre

    centres[0] = points[rng.integers(len(points))]
    nearest = squared_distance(centres[0])
    for i in range(1, k):
        cumulative = np.cumsum(np.maximum(nearest, 0), dtype=np.float64)
        pick = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
        centres[i] = points[min(pick, len(points) - 1)]
        nearest = np.minimum(nearest, squared_distance(centres[i]))
    return centres


@dataclass
class PointSource:
    """``count`` points that k-means reads in two ways: the weighted squared norms of a range
    (``energies(start, stop)``) and the points at chosen sorted indices with their weights
    (``take(index)``, weights None when unweighted). A large layer's points (a token embedding's
    84 million sub-vectors) need not exist as one array: k-means only fits a sample of them."""
    count: int
    energies: Callable[[int, int], np.ndarray]
    take: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def in_memory(points: np.ndarray, weights: np.ndarray | None = None) -> PointSource:
    """A ``PointSource`` over arrays: (n, d) float32 points and their (n,) weights."""
    def energies(start: int, stop: int) -> np.ndarray:
        part = points[start:stop]
        return np.einsum("ij,ij->i", part, part) * (1 if weights is None else weights[start:stop])  # no (n, d) temporary

    return PointSource(len(points), energies, lambda index: (points[index], None if weights is None else weights[index]))


def kmeans(points: np.ndarray | PointSource, k: int, seed: int = 0, iterations: int = 20,
           max_points_per_centroid: int = 256, weights: np.ndarray | None = None) -> np.ndarray:
    """Train ``k`` centroids on (n, d) float32 ``points`` (each with its ``weight`` in the
    objective, if given), or on a ``PointSource``; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    source = points if isinstance(points, PointSource) else in_memory(np.ascontiguousarray(points, dtype=np.float32), weights)
    points, weights = source.take(_subsample(source, k, k * max_points_per_centroid, rng)
                                  if source.count > k * max_points_per_centroid else np.arange(source.count))
    seeding_sample = points[_subsample(in_memory(points, weights), k, 32 * k, rng)] if len(points) > 32 * k else points
    init = kmeans_pp_seed(seeding_sample, k, rng)
    engine = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed,  # already subsampled: faiss keeps all
                          max_points_per_centroid=len(points) // k + 1, min_points_per_centroid=1)
    with _threads(1 if len(points) * k < SMALL_FIT else faiss.omp_get_max_threads()):
        engine.train(np.ascontiguousarray(points, dtype=np.float32),
                     None if weights is None else np.ascontiguousarray(weights, dtype=np.float32), init_centroids=init)
    return engine.centroids


def _subsample(source: PointSource, k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random sample of ``size`` points plus the ``k`` of largest (weighted)
    norm: a sample alone drops the rare outlier weights, whose error then dwarfs all the rest."""
    return np.union1d(rng.choice(source.count, size, replace=False), _largest(source.energies, source.count, k))


def assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every point (exact search)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return nearest[:, 0]


def _largest(values: Callable[[int, int], np.ndarray], count: int, k: int, chunk: int = 1 << 20) -> np.ndarray:
    """Indices of the ``k`` largest of ``count`` values, read a chunk at a time (``values(start,
    stop)``): each chunk's k largest, then the k largest of those (no full-length array)."""
    def top(part: np.ndarray) -> np.ndarray:
        return np.argpartition(-part, k)[:k] if len(part) > k else np.arange(len(part))

    candidates, candidate_values = [], []
    for start in range(0, count, chunk):
        part = values(start, min(start + chunk, count))
        best = top(part)
        candidates.append(start + best)
        candidate_values.append(part[best])
    candidates, candidate_values = np.concatenate(candidates), np.concatenate(candidate_values)
    return candidates[top(candidate_values)]


def weighted_distances(points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Σ_j w_ij (x_ij − c_j)² for every point i and centroid c, less Σ_j w_ij x_ij² (the same for
    every centroid of a point, so it changes no argmin): one matrix product of the two side by side."""
    return torch.cat([weights, weights * points], 1) @ torch.cat([centroids.square(), -2 * centroids], 1).T


def weighted_assign(points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor,
                    chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest centroid of each point under its own per-coordinate weights."""
    return torch.cat([weighted_distances(points[i:i + chunk], weights[i:i + chunk], centroids).argmin(1)
                      for i in range(0, len(points), chunk)])


def nearest_candidates(points: torch.Tensor, weights: torch.Tensor, codebooks: torch.Tensor, group_of_row: torch.Tensor,
                       n: int, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-vector's ``n`` nearest codewords under its weighted squared distance, nearest first,
    and those distances. ``points`` and ``weights`` are (rows, segments, d), ``codebooks``
    (groups, k, d), row r using ``codebooks[group_of_row[r]]``; rows go in chunks of about
    ``chunk`` distances, so memory stays small."""
    step = max(1, chunk // (points.shape[1] * codebooks.shape[1]))
    indices, distances = [], []
    with torch.no_grad():
        for start in range(0, len(points), step):
            p, w = points[start:start + step], weights[start:start + step]
            books = codebooks[group_of_row[start:start + step]]  # (rows, k, d)
            distance = torch.einsum("rsd,rkd->rsk", w, books.square()) - 2 * torch.einsum("rsd,rkd->rsk", w * p, books)
            nearest = distance.topk(n, dim=-1, largest=False)
            indices.append(nearest.indices)
            distances.append((nearest.values + (w * p.square()).sum(-1, keepdim=True)).clamp_min(0))
    return torch.cat(indices), torch.cat(distances)
