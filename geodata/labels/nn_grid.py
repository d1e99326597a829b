"""Exact nearest place on raw (lat, lon) degrees through an adaptive grid of candidate lists.

reverse_geocoder answers "nearest GeoNames place by Euclidean distance in degree space"
with a kd-tree. For millions of points a lookup table is faster: the globe
[-90, 90] x [-180, 180] is cut into cells of 2**-level0_log2 degrees; every cell stores
the places that can be nearest to some point of the cell (a superset), and
a cell with several candidates is split into 2**branch_log2 x 2**branch_log2 children,
down to ``levels`` splits. A query walks down to its leaf and then:

- a leaf with one candidate answers it;
- a leaf with K candidates (2 <= K <= kmax) compares the exact-arithmetic-equivalent
  scores |q|^2 - 2 q.p (= |p - q|^2 - |p|^2) and answers when the best beats the
  second by more than ``TIE_TOL_DEG2``, far above the rounding of either the scores or a
  kd-tree's own distance arithmetic, so the unique nearest place is what any exact
  search (reverse_geocoder's tree included) returns;
- otherwise (a point outside the grid, a cell far from every place, a leaf with more
  than kmax candidates, or a near-tie such as two places at the same coordinates) the
  point is left undecided (-1) for the caller's kd-tree, which breaks ties its own way.

The candidate sets are built by geodata.labels.nn_grid_build (why they are supersets of the
true nearest places is explained there).

On the 144,563 places of cities1000 with the default GridParams: ~5 s to build (peak
~360 MB above the places), ~46 MB in memory, a 41 MB file (``save``/``load``: callers
cache it); a query takes ~50 ns per OSV-5M-like point on one core, and leaves ~0.3% of
them (and most open-ocean points) to the kd-tree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from geodata.labels.nn_grid_build import GridParams, build_grid_arrays

#: Bump when the build or file layout changes: cached grids of other versions are rebuilt.
GRID_FORMAT_VERSION = 1

#: Two scores closer than this (degrees squared) are a (near-)tie: left to the kd-tree.
#: Score rounding is below 1.2e-10 (magnitudes <= 2e5 deg^2, a few roundings each) and a
#: kd-tree's distance rounding below 1e-12 at the distances reached (<= rmax_deg).
TIE_TOL_DEG2 = 1e-8


class NearestGrid:
    """Adaptive grid answering "nearest place" exactly, or -1 (undecided) for the caller's kd-tree.

    lat_deg, lon_deg: (P,) float64 place coordinates (row order = the returned indices).
    nodes: int32 node values: >= P: leaf with candidate set ``value - P``; 0..P-1: leaf
    with that single place; -1: undecided; <= -2: split cell, children from ``-2 - value``.
    sets: (S, kmax) int32 candidate sets, -1 padded, sizes ascending (k_starts[k] is the
    first set of size k).
    """

    def __init__(
        self,
        lat_deg: np.ndarray,
        lon_deg: np.ndarray,
        nodes: np.ndarray,
        sets: np.ndarray,
        k_starts: np.ndarray,
        params: GridParams,
    ) -> None:
        self.params = params
        self.nodes = np.ascontiguousarray(nodes, dtype=np.int32)
        sets = np.asarray(sets, dtype=np.int32)
        self.k_starts = np.asarray(k_starts, dtype=np.int64)
        lat = np.asarray(lat_deg, dtype=np.float64)
        lon = np.asarray(lon_deg, dtype=np.float64)
        self.n_places = len(lat)
        if sets.shape != (self.k_starts[-1], params.kmax) or self.k_starts[2] != 0:
            raise ValueError(f"candidate sets of shape {sets.shape} do not match k_starts {self.k_starts.tolist()}")
        split = self.nodes[self.nodes <= -2]
        last_child = int((-2 - split).max()) + (1 << 2 * params.branch_log2) if len(split) else 0
        if (
            sets.max(initial=-1) >= self.n_places
            or self.nodes.max(initial=-1) >= self.n_places + len(sets)
            or last_child > len(self.nodes)
        ):
            raise ValueError(f"grid does not fit {self.n_places} places (node or candidate out of range)")
        # candidate sets column by column (contiguous for take); pairs are rows [0, k_starts[3])
        self._set_columns = [np.ascontiguousarray(sets[:, c]) for c in range(params.kmax)]
        # score(q, p) = |q|^2 - 2 q.p = |p - q|^2 - |p|^2: the nearest place has the lowest
        self._sq = lat * lat + lon * lon
        self._lat2 = 2.0 * lat
        self._lon2 = 2.0 * lon
        # two-candidate sets: score(q1) - score(q2) = c - (a lat + b lon), per set
        q1, q2 = (col[: self.k_starts[3]] for col in self._set_columns[:2])
        self._pair_coef = (
            self._sq[q1] - self._sq[q2],
            self._lat2[q1] - self._lat2[q2],
            self._lon2[q1] - self._lon2[q2],
        )

    @property
    def sets(self) -> np.ndarray:
        """(S, kmax) int32 candidate sets, -1 padded, sizes ascending."""
        return np.column_stack(self._set_columns) if self._set_columns else np.zeros((0, 0), np.int32)

    @classmethod
    def build(
        cls,
        lat_deg: np.ndarray,
        lon_deg: np.ndarray,
        tree: cKDTree | None = None,
        params: GridParams | None = None,
        workers: int = -1,
    ) -> NearestGrid:
        """Build over (P,) place coordinates in degrees; tree: a cKDTree of (lat, lon) (made if None)."""
        params = params or GridParams()
        lat = np.asarray(lat_deg, dtype=np.float64)
        lon = np.asarray(lon_deg, dtype=np.float64)
        if lat.ndim != 1 or lat.shape != lon.shape or len(lat) == 0:
            raise ValueError(f"need two equal (P,) coordinate arrays, P >= 1; got {lat.shape} and {lon.shape}")
        if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
            raise ValueError("place coordinates must be finite")
        if tree is None:
            tree = cKDTree(np.column_stack([lat, lon]))
        nodes, sets, k_starts = build_grid_arrays(lat, lon, tree, params, workers)
        return cls(lat, lon, nodes, sets, k_starts, params)

    @property
    def nbytes(self) -> int:
        return self.nodes.nbytes + sum(x.nbytes for x in (*self._pair_coef, *self._set_columns))

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | Path, key: str = "") -> None:
        """Write the grid (not the places) as .npz to ``path`` (a path or binary file).

        key: free text stored with it (the caller's cache key), returned by ``load``.
        """
        np.savez(
            path,
            nodes=self.nodes,
            sets=self.sets,
            k_starts=self.k_starts,
            params=np.array(dataclasses.astuple(self.params), dtype=np.float64),
            version=np.array(GRID_FORMAT_VERSION),
            key=np.array(key),
        )

    @classmethod
    def load(cls, path: str | Path, lat_deg: np.ndarray, lon_deg: np.ndarray) -> tuple[NearestGrid, str]:
        """(grid, key) from a file written by ``save``, for these places.

        Raises ValueError for another format version or a grid that cannot belong to
        these places (out-of-range indices); OSError/zipfile errors for unreadable files.
        """
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"])
            if version != GRID_FORMAT_VERSION:
                raise ValueError(f"{path}: grid format {version}, expected {GRID_FORMAT_VERSION}")
            values = z["params"].tolist()
            fields = dataclasses.fields(GridParams)
            params = GridParams(**{f.name: type(f.default)(v) for f, v in zip(fields, values)})
            grid = cls(lat_deg, lon_deg, z["nodes"], z["sets"], z["k_starts"], params)
            key = str(z["key"])
        return grid, key

    # -- query -------------------------------------------------------------------------

    def query(self, lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
        """Nearest place index of each point, or -1 where the grid does not decide.

        lat_deg, lon_deg: (N,) float64 degrees, finite (outside [-90, 90] x [-180, 180]
        gives -1). Returns (N,) int64. The caller answers the -1 points with its kd-tree.
        """
        p = self.params
        lat = np.asarray(lat_deg, dtype=np.float64)
        lon = np.asarray(lon_deg, dtype=np.float64)
        x = lat + 90.0
        y = lon + 180.0
        inside = (x >= 0.0) & (x <= 180.0) & (y >= 0.0) & (y <= 360.0)
        # finest-level integer cell coordinates (x * 2^k is exact); level l uses i >> shift.
        # The clip keeps lat = 90 / lon = 180 in the last cell and outside points in range.
        scale = float(1 << p.finest_log2)
        i = np.clip(x * scale, 0.0, (180 << p.finest_log2) - 1).astype(np.int64)
        j = np.clip(y * scale, 0.0, (360 << p.finest_log2) - 1).astype(np.int64)
        shift = p.levels * p.branch_log2
        v = self.nodes.take((i >> shift) * (360 << p.level0_log2) + (j >> shift))
        mask = (1 << p.branch_log2) - 1
        down = np.flatnonzero(v <= -2)
        for level in range(1, p.levels + 1):
            if len(down) == 0:
                break
            shift = (p.levels - level) * p.branch_log2
            child = (-2 - v.take(down).astype(np.int64)) + (((i.take(down) >> shift) & mask) << p.branch_log2)
            child += (j.take(down) >> shift) & mask
            sub = self.nodes.take(child)
            v[down] = sub
            down = down[sub <= -2]
        v[~inside] = -1
        out = v.astype(np.int64)
        multi = np.flatnonzero(v >= self.n_places)
        if len(multi):
            out[multi] = self._decide(v.take(multi) - self.n_places, lat.take(multi), lon.take(multi))
        return out

    def _decide(self, set_id: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(n,) points in leaves with candidate sets ``set_id`` -> (n,) the candidate with
        the lowest score, or -1 where the second lowest is within TIE_TOL_DEG2 (near-tie).
        Gathers use ``take`` on 1-D arrays: several times faster than 2-D fancy indexing."""
        out = np.full(len(set_id), -1, dtype=np.int64)
        sel = np.flatnonzero(set_id < self.k_starts[3])
        if len(sel):
            row = set_id.take(sel)
            c, a, b = (x.take(row) for x in self._pair_coef)
            diff = c - (a * lat.take(sel) + b * lon.take(sel))  # score(q1) - score(q2)
            q1, q2 = (x.take(row) for x in self._set_columns[:2])
            out[sel] = np.where(diff < -TIE_TOL_DEG2, q1, np.where(diff > TIE_TOL_DEG2, q2, -1))
        for k in range(3, self.params.kmax + 1):
            sel = np.flatnonzero((set_id >= self.k_starts[k]) & (set_id < self.k_starts[k + 1]))
            if len(sel) == 0:
                continue
            row, la, lo = set_id.take(sel), lat.take(sel), lon.take(sel)
            best = np.full(len(sel), np.inf)
            second = np.full(len(sel), np.inf)
            arg = np.full(len(sel), -1, dtype=np.int64)
            for column in self._set_columns[:k]:
                q = column.take(row)
                score = self._sq.take(q) - (self._lat2.take(q) * la + self._lon2.take(q) * lo)
                better = score < best
                second = np.where(better, best, np.minimum(second, score))
                arg = np.where(better, q, arg)
                best = np.minimum(best, score)
            out[sel] = np.where(second - best > TIE_TOL_DEG2, arg, -1)
        return out
