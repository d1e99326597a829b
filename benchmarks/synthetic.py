"""Synthetic OSV-5M-size entity hierarchies and queries, for the benchmarks.

Sizes default to the paper's entity table (233 countries, 4.9k regions, 29k
sub-regions, 210k cities: HIERLOC.md). Fan-out is heavy-tailed as in the real
GeoNames hierarchy: every parent has at least one child (entities come from the
training labels), and the rest are spread with log-normal weights, so a few parents
have hundreds of children (a country with 80 regions, a placeholder sub-region
holding all the cities of its region) and most have a handful.

Points: tangent vectors at the origin where each child is its parent plus noise and
norms grow with depth, mapped onto the hyperboloid (geoopt's Lorentz(k=K)), so a
beam search has a real hierarchy to walk. Queries sit near random cities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OSV5M_LEVEL_SIZES = (233, 4_900, 29_000, 210_000)


@dataclass
class SyntheticHierarchy:
    level_sizes: list[int]
    parent_index: np.ndarray  # (N,) table row of the parent, -1 at the top
    tangent: np.ndarray  # (N, d) tangent vectors at the origin
    curvature: float

    def points(self) -> np.ndarray:
        """(N, d+1) hyperboloid points, time coordinate first."""
        return expmap0_np(self.tangent, self.curvature)

    def fanout(self, level: int) -> np.ndarray:
        """Children per parent of level ``level - 1``."""
        off = np.cumsum([0, *self.level_sizes])
        par = self.parent_index[off[level] : off[level + 1]] - off[level - 1]
        return np.bincount(par, minlength=self.level_sizes[level - 1])


def expmap0_np(v: np.ndarray, curvature: float) -> np.ndarray:
    """exp_o(v) = (R cosh(|v|/R), R sinh(|v|/R) v/|v|), R = sqrt(K): (N, d) -> (N, d+1)."""
    r = np.sqrt(curvature)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    space = r * np.sinh(norm / r) * v / np.maximum(norm, 1e-12)
    time = np.sqrt(curvature + (space * space).sum(1, keepdims=True))
    return np.concatenate([time, space], axis=1).astype(np.float32)


def skewed_parents(n_children: int, n_parents: int, rng: np.random.Generator, sigma: float = 1.2) -> np.ndarray:
    """Parent (0..n_parents-1) of each child: one child each, the rest log-normally spread."""
    if n_children < n_parents:
        raise ValueError(f"{n_children} children cannot give each of {n_parents} parents one")
    w = rng.lognormal(0.0, sigma, n_parents)
    extra = rng.multinomial(n_children - n_parents, w / w.sum())
    return np.repeat(np.arange(n_parents), 1 + extra)


def make_hierarchy(
    level_sizes: tuple[int, ...] = OSV5M_LEVEL_SIZES, dim: int = 128, curvature: float = 1.0, seed: int = 0,
    sigma: float = 1.2,
) -> SyntheticHierarchy:
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in level_sizes]
    off = np.cumsum([0, *sizes])
    parent = np.full(off[-1], -1, dtype=np.int64)
    tangent = np.empty((off[-1], dim), dtype=np.float32)
    # Norms grow with depth (countries near the origin); siblings spread around the parent.
    tangent[: sizes[0]] = rng.normal(size=(sizes[0], dim)) * (1.5 / np.sqrt(dim))
    for lvl in range(1, len(sizes)):
        par_local = skewed_parents(sizes[lvl], sizes[lvl - 1], rng, sigma)
        rows = slice(off[lvl], off[lvl + 1])
        parent[rows] = off[lvl - 1] + par_local
        noise = rng.normal(size=(sizes[lvl], dim)) * (0.6 / np.sqrt(dim))
        tangent[rows] = 1.35 * tangent[off[lvl - 1] + par_local] + noise
    return SyntheticHierarchy(sizes, parent, tangent, curvature)


def make_queries(h: SyntheticHierarchy, n: int, seed: int = 1, noise: float = 0.5) -> np.ndarray:
    """(n, d+1) query points near random cities (tangent noise of ``noise`` in norm)."""
    rng = np.random.default_rng(seed)
    off = np.cumsum([0, *h.level_sizes])
    city = rng.integers(off[-2], off[-1], n)
    d = h.tangent.shape[1]
    v = h.tangent[city] + rng.normal(size=(n, d)).astype(np.float32) * (noise / np.sqrt(d))
    return expmap0_np(v, h.curvature)
