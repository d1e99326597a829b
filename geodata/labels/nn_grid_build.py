"""Building the candidate lists of a nearest-place grid (geodata.labels.nn_grid: the grid,
its query and its file).

Candidate sets are supersets by construction. A cell's nearest-place distance is at most
U = min over reference places r of max over the cell's corners |corner - r| (the distance
to a fixed place is convex, so its maximum over a rectangle is at a corner). Level 0
collects every place within U + half-diagonal of the centre (all places within U of the
rectangle). A place q is dropped when one reference place r is strictly closer than q at
all four corners: the set where q is at least as close as r is a half-plane, and a
half-plane that meets a rectangle contains one of its corners, so q is then nearer than
r nowhere in the cell. Children inherit their parent's candidates (a child is inside its
parent) and prune them again with the places nearest to their own corners. Rectangles
are widened by ``RECT_PAD_DEG`` and comparisons keep a margin, so rounding of the query's
cell index or of the build's own arithmetic never drops a true nearest place.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator

import numpy as np
from scipy.spatial import cKDTree

from geodata.progress import Progress

log = logging.getLogger(__name__)

#: Rectangles are widened by this much (degrees) on every side, covering the rounding of
#: lat + 90 / lon + 180 (<= 2.9e-14) that decides which cell a query falls in.
RECT_PAD_DEG = 1e-9

#: Pruning keeps q unless a reference is closer at every corner by this relative and
#: absolute margin (degrees squared), far above the rounding of the squared distances.
_PRUNE_REL = 1e-9
_PRUNE_ABS = 1e-11

#: Reference places per level-0 cell (nearest to its centre) used for U and pruning.
_LEVEL0_REFS = 4

#: Pairs (cell, candidate) processed at once while building (bounds build memory).
_PAIRS_PER_CHUNK = 262_144

#: Level-0 cells processed at once while building.
_CELLS_PER_CHUNK = 65_536

_FALLBACK = -1  # node value: leave the point to the kd-tree


@dataclasses.dataclass(frozen=True)
class GridParams:
    """Shape of the grid. Cell size at level l: 2**-(level0_log2 + l * branch_log2) degrees."""

    level0_log2: int = 2  # level-0 cells of 0.25 degrees (720 x 1440)
    branch_log2: int = 2  # each split makes 4 x 4 children
    levels: int = 2  # splits below level 0: finest cells of 1/64 degree
    kstop: int = 2  # a cell with <= kstop candidates is a leaf (not split further)
    kmax: int = 6  # at the finest level, a cell with > kmax candidates falls back
    rmax_deg: float = 3.0  # a level-0 cell whose bound U + half-diagonal exceeds this falls back

    def __post_init__(self) -> None:
        if not (
            0 <= self.level0_log2 <= 8
            and 1 <= self.branch_log2 <= 4
            and 0 <= self.levels
            and 1 <= self.kstop <= self.kmax
            and self.kmax >= 2
            and self.rmax_deg > 0
        ):
            raise ValueError(f"invalid grid parameters: {self}")

    def cell_deg(self, level: int) -> float:
        return 2.0 ** -(self.level0_log2 + level * self.branch_log2)

    @property
    def finest_log2(self) -> int:
        return self.level0_log2 + self.levels * self.branch_log2


class _Rects:
    """Padded cell rectangles: lat0 <= lat <= lat1, lon0 <= lon <= lon1, each (n,) float64."""

    def __init__(self, i: np.ndarray, j: np.ndarray, cell_deg: float) -> None:
        # i * cell_deg - 90 is exact (cell_deg a power of two); the pad covers query rounding
        self.lat0 = i * cell_deg - 90.0 - RECT_PAD_DEG
        self.lat1 = (i + 1) * cell_deg - 90.0 + RECT_PAD_DEG
        self.lon0 = j * cell_deg - 180.0 - RECT_PAD_DEG
        self.lon1 = (j + 1) * cell_deg - 180.0 + RECT_PAD_DEG

    def corner_sq_dists(
        self, lat: np.ndarray, lon: np.ndarray, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        """Squared degree distances from (lat, lon) to the 4 corners of rectangles ``rows``
        (all when None): 4 arrays, corners (lat0, lon0), (lat0, lon1), (lat1, lon0), (lat1, lon1)."""
        take = (lambda a: a) if rows is None else (lambda a: a[rows])
        a0 = (take(self.lat0) - lat) ** 2
        a1 = (take(self.lat1) - lat) ** 2
        b0 = (take(self.lon0) - lon) ** 2
        b1 = (take(self.lon1) - lon) ** 2
        return a0 + b0, a0 + b1, a1 + b0, a1 + b1


def _dominated(dq: tuple[np.ndarray, ...], dr: tuple[np.ndarray, ...]) -> np.ndarray:
    """True where the reference (squared corner distances dr) is closer than the candidate
    (dq) at all four corners by more than the rounding margin: the candidate is then
    nearer than the reference nowhere in the rectangle, so never the nearest place there."""
    out = dq[0] > dr[0] * (1.0 + _PRUNE_REL) + _PRUNE_ABS
    for a, b in zip(dq[1:], dr[1:]):
        out &= a > b * (1.0 + _PRUNE_REL) + _PRUNE_ABS
    return out


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    """(n,) counts -> (n + 1,) int64 offsets of each segment, last = total."""
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts


class _Build:
    """Breadth-first construction; see the module docstring."""

    def __init__(self, lat: np.ndarray, lon: np.ndarray, tree: cKDTree, params: GridParams, workers: int):
        self.lat, self.lon, self.tree, self.p, self.workers = lat, lon, tree, params, workers
        self.n_places = len(lat)
        self.node_levels: list[np.ndarray] = []  # per level: int64 node values
        self.leaf_cands: list[np.ndarray] = []  # batches of (n, K) candidate sets of leaves
        self.leaf_nodes: list[np.ndarray] = []  # global node index of each leaf of a batch
        self.bar: Progress | None = None  # run's progress

    def level0_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Pruned (cell, candidate) pairs of the level-0 cells, sorted by cell."""
        p = self.p
        cell = p.cell_deg(0)
        n_lat, n_lon = 180 << p.level0_log2, 360 << p.level0_log2
        half_diag = np.hypot(cell / 2 + RECT_PAD_DEG, cell / 2 + RECT_PAD_DEG)
        cells, cands = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for first in range(0, n_lat * n_lon, _CELLS_PER_CHUNK):
            ids = np.arange(first, min(first + _CELLS_PER_CHUNK, n_lat * n_lon), dtype=np.int64)
            rect = _Rects(*np.divmod(ids, n_lon), cell)
            cen = np.column_stack([(rect.lat0 + rect.lat1) / 2, (rect.lon0 + rect.lon1) / 2])
            n_refs = min(_LEVEL0_REFS, self.n_places)
            _, refs = self.tree.query(cen, k=n_refs, workers=self.workers)
            refs = refs.reshape(len(cen), n_refs)
            dref = [rect.corner_sq_dists(self.lat[r], self.lon[r]) for r in refs.T]
            # U = min over references of max over corners |corner - ref| bounds the
            # nearest-place distance of every point of the cell; candidates lie within U
            # of the rectangle, hence within U + half-diagonal of its centre.
            bound = np.sqrt(np.min([np.max(d, axis=0) for d in dref], axis=0))
            radius = (bound + half_diag) * (1.0 + 1e-9) + 1e-9  # margin for rounding
            usable = np.flatnonzero(radius <= p.rmax_deg)
            lists = self.tree.query_ball_point(cen[usable], radius[usable], workers=self.workers, return_sorted=False)
            lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            q = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
            local = np.repeat(usable, lens)
            dq = rect.corner_sq_dists(self.lat[q], self.lon[q], local)
            keep = np.ones(len(q), dtype=bool)
            for k, d in enumerate(dref):
                ref = refs[local, k]
                keep &= ~(_dominated(dq, tuple(x[local] for x in d)) & (ref != q))
            cells.append(ids[local[keep]])
            cands.append(q[keep])
            if self.bar is not None:
                self.bar.update()
        self.node_levels.append(np.full(n_lat * n_lon, _FALLBACK, dtype=np.int64))
        self.level_ij = np.divmod(np.arange(n_lat * n_lon, dtype=np.int64), n_lon)
        return np.concatenate(cells), np.concatenate(cands)

    def child_pairs(
        self,
        level: int,
        parents: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        cands: np.ndarray,
        ci: np.ndarray,
        cj: np.ndarray,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pruned (child, candidate) pairs of the children of ``parents`` (local indices of
        level ``level`` cells), chunk by chunk, sorted by child. Children are numbered
        parent-major; ci, cj are their cell coordinates at level + 1."""
        nb = 1 << (2 * self.p.branch_log2)
        cell = self.p.cell_deg(level + 1)
        bounds = _segment_starts(counts[parents] * nb)
        first = 0
        while first < len(parents):
            last = int(np.searchsorted(bounds, bounds[first] + _PAIRS_PER_CHUNK, side="right")) - 1
            last = max(last, first + 1)
            par = parents[first:last]
            kids = np.arange(first * nb, last * nb, dtype=np.int64)
            rect = _Rects(ci[kids], cj[kids], cell)
            k = np.repeat(counts[par], nb)  # a child starts from its parent's candidates
            ks = _segment_starts(k)
            pair_child = np.repeat(np.arange(len(kids), dtype=np.int64), k)
            offs = np.arange(ks[-1], dtype=np.int64) - ks[pair_child]
            q = cands[np.repeat(starts[par], nb)[pair_child] + offs]
            dq = rect.corner_sq_dists(self.lat[q], self.lon[q], pair_child)
            # references: the candidate nearest to each corner (the nearest place there)
            keep = np.ones(len(q), dtype=bool)
            for corner in range(4):
                best = np.minimum.reduceat(dq[corner], ks[:-1])
                hit = np.flatnonzero(dq[corner] == best[pair_child])
                ref = np.empty(len(kids), dtype=np.int64)
                ref[pair_child[hit]] = q[hit]  # any nearest candidate of the corner will do
                dr = rect.corner_sq_dists(self.lat[ref], self.lon[ref])
                keep &= ~(_dominated(dq, tuple(d[pair_child] for d in dr)) & (ref[pair_child] != q))
            yield kids[pair_child[keep]], q[keep]
            first = last

    def classify(
        self, level: int, pair_cell: np.ndarray, pair_q: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Turn a level's pruned pairs (sorted by cell) into leaves, fallbacks and split
        cells; return the next level's pairs (None at the finest level)."""
        p = self.p
        nodes = self.node_levels[level]
        counts = np.bincount(pair_cell, minlength=len(nodes))
        starts = _segment_starts(counts)[:-1]
        single = np.flatnonzero(counts == 1)
        nodes[single] = pair_q[starts[single]]
        finest = level == p.levels
        kleaf = p.kmax if finest else p.kstop
        base = sum(len(x) for x in self.node_levels[:level])
        for k in range(2, kleaf + 1):
            leaves = np.flatnonzero(counts == k)
            if len(leaves):
                self.leaf_cands.append(pair_q[starts[leaves][:, None] + np.arange(k)])
                self.leaf_nodes.append(base + leaves)
        if finest:
            return None  # cells with more than kmax candidates stay _FALLBACK
        parents = np.flatnonzero(counts > kleaf)
        b = 1 << p.branch_log2
        nb = b * b
        nodes[parents] = -2 - (base + len(nodes) + np.arange(len(parents), dtype=np.int64) * nb)
        di, dj = np.divmod(np.arange(nb, dtype=np.int64), b)
        pi, pj = self.level_ij
        ci = (pi[parents][:, None] * b + di).ravel()
        cj = (pj[parents][:, None] * b + dj).ravel()
        cells, cands = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        for c, q in self.child_pairs(level, parents, starts, counts, pair_q, ci, cj):
            cells.append(c.astype(np.int32))  # int32 halves the build's peak memory
            cands.append(q.astype(np.int32))
        self.node_levels.append(np.full(len(ci), _FALLBACK, dtype=np.int64))
        self.level_ij = (ci, cj)
        return np.concatenate(cells), np.concatenate(cands)

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_cells0 = (180 << self.p.level0_log2) * (360 << self.p.level0_log2)
        # progress: each chunk of level-0 cells, then each level below (about half the time each)
        self.bar = Progress(-(-n_cells0 // _CELLS_PER_CHUNK) + self.p.levels + 1, "building the nearest-place grid",
                            unit="parts", logger=log)
        with self.bar:
            pairs = self.level0_pairs()
            for level in range(self.p.levels + 1):
                pairs = self.classify(level, *pairs)
                self.bar.update()
                if pairs is None:
                    break
        del self.level_ij
        nodes = np.concatenate(self.node_levels)
        self.node_levels.clear()
        # Leaves share candidate sets (a Voronoi edge crosses many cells): store each
        # distinct set once, sorted by size; a leaf's node value is n_places + set id.
        sets_by_k: list[np.ndarray] = []
        n_sets = 0
        for k in range(2, self.p.kmax + 1):
            batches = [(c, n) for c, n in zip(self.leaf_cands, self.leaf_nodes) if c.shape[1] == k]
            if not batches:
                sets_by_k.append(np.zeros((0, k), dtype=np.int64))
                continue
            rows = np.sort(np.concatenate([c for c, _ in batches]), axis=1).astype(np.int64)
            if self.n_places**k < 2**63:  # one int64 key per set: far lighter than axis=0
                key = rows[:, 0]
                for c in range(1, k):
                    key = key * self.n_places + rows[:, c]
                _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
                uniq = rows[first]
            else:
                uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
            nodes[np.concatenate([n for _, n in batches])] = self.n_places + n_sets + inverse.ravel()
            sets_by_k.append(uniq)
            n_sets += len(uniq)
        sets = np.full((n_sets, self.p.kmax), -1, dtype=np.int64)
        k_starts = np.zeros(self.p.kmax + 2, dtype=np.int64)  # sets of size k: [k_starts[k], k_starts[k + 1])
        row = 0
        for k, uniq in zip(range(2, self.p.kmax + 1), sets_by_k):
            k_starts[k] = row
            sets[row : row + len(uniq), :k] = uniq
            row += len(uniq)
        k_starts[self.p.kmax + 1] = row
        if self.n_places + n_sets >= 2**31 or nodes.min(initial=0) < -(2**31):
            raise ValueError("grid too large for int32 node values; use fewer levels")
        return nodes.astype(np.int32), sets.astype(np.int32), k_starts


def build_grid_arrays(
    lat: np.ndarray, lon: np.ndarray, tree: cKDTree, params: GridParams, workers: int = -1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Node values, candidate sets and set offsets of the grid over (P,) place coordinates
    (degrees; tree: their cKDTree of (lat, lon)); the arrays of geodata.labels.nn_grid.NearestGrid."""
    return _Build(lat, lon, tree, params, workers).run()
