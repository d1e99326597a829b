"""The ``polygons`` labeler: which admin polygon holds each point, level by level, and its city.

Input: an admin table in the schema of ``geodata.admin.schema`` (``ADMIN_COLUMNS``, EPSG:4326, level
0 country, 1 region, 2 sub-region, ``code`` unique, ``parent_code`` the code one level up).
Points are (lat_deg, lon_deg) in EPSG:4326, lat in [-90, 90], lon in [-180, 180].

Rules (the same for every level):

- Inside. Polygons are closed: a point on a polygon's boundary is inside it (shapely
  ``covers``). A point on a border shared by two polygons, or inside two overlapping ones,
  goes to the one with the smallest ``code`` (Python string order). For points strictly inside
  one polygon the result is what ``geopandas.sjoin(points, polygons, predicate="within")`` gives.
- Snapping. A point in no polygon (sea, coast, gaps between units) goes to the nearest polygon
  of that level if it lies within ``max_snap_km``; reason "snapped" and ``snap_km``. Otherwise
  it stays unassigned: reason "no_polygon_within_<X>km". Distances are great-circle on a sphere
  of radius 6371 km, to the polygon's boundary densified to 0.05 deg: candidate boundary chains
  are those in the bounding box of the spherical cap around the point (split in two where it
  crosses +-180, all longitudes where it holds a pole); their vertices are projected onto the
  plane tangent to the sphere at the point, where a vertex at central angle c lies at sin(c)
  from the origin. Distances are exact at vertices and within a metre between them, and the
  antimeridian and the poles need no special case. Ties go to the smallest code.
- Consistency between levels (parent_code chain). Each point's anchor is its deepest level
  assigned from inside a polygon, else its deepest snapped level. Coarser levels take the
  anchor's ancestors; a finer snapped level whose ancestor at the anchor's level is the anchor
  becomes the anchor (and fills the levels between); other finer ones are dropped. Reasons:
  "from_<level>" (was unassigned, filled from that level's chain), "overridden_by_<level>"
  (had another polygon: a disagreement), "disagrees_with_<level>" (a finer polygon outside the
  anchor, dropped: a disagreement). Where a chain is broken (a parent missing from the table)
  the level keeps its own polygon. ``label_report`` counts all this.
- Antimeridian and poles. Natural Earth stores polygons crossing +-180 as parts split there,
  and noisy coordinates such as -179.99999999999991 or -89.99999999999994: coordinates within
  1e-9 deg of +-180 / +-90 are set to the bound when preparing. A point at lon = +-180 is
  looked up at both +180 and -180 (the same place). A point at a pole lies on a polygon edge
  along lat = +-90 whatever its lon; a polygon that stops short of the pole is reached by
  snapping, where the pole is one point.

Speed: polygons are split into parts and, with ``grid_deg`` > 0, cut on a grid of cells
anchored at (-180, -90) by recursive halving (``shapely.clip_by_rect``), so each piece is
small. ``label`` builds one STRtree on the points and queries it with each level's pieces
(``predicate="covers"``), which is ~15x faster than a tree of polygons queried with points.

Cities: ``PolygonLabeler.assign_cities`` picks the nearest GeoNames place inside the point's
deepest polygon, labelling the places themselves once with the same polygons.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from scipy.spatial import cKDTree

from geodata.admin.schema import LEVEL_NAMES, validate_admin
from geodata.atomic import atomic_write_path
from geodata.labels.geonames import parse_coordinates
from geodata.labels.hierarchy import unit_xyz

#: Sphere radius (km), the one of the project's haversine (hierloc.geometry.geo, not importable here).
EARTH_RADIUS_KM = 6371.0
#: Largest accepted max_snap_km: snapping measures every boundary chain in the cap's bounding
#: box, so its cost grows with the cap's area; beyond this it is no longer border noise.
MAX_SNAP_LIMIT_KM = 500.0
#: Columns of a partition read by label_partition.
PARTITION_COLUMNS: tuple[str, ...] = ("id", "latitude", "longitude")

_ORIGIN = np.array([-180.0, -90.0])  # grid cells are anchored at the world's lower-left corner
_BOUND_TOL_DEG = 1e-9  # coordinates this close to +-180 / +-90 are set to the bound
_CELL_SLACK = 1e-9  # fraction of a cell by which a piece may overrun a grid line (rounding)
_MAX_CUT_ROUNDS = 64  # halvings; 360 / 2**32 deg is far below any sensible grid_deg
_GROUP_SPACING = 4.0  # > 2, the largest chord between unit vectors: keeps kd-tree groups apart
_NO_ROW = -1
_SEGMENT_DEG = 0.05  # boundaries densified to this: lon/lat-straight ~ great-circle within metres
_CHAIN_SEGMENTS = 16  # segments per indexed chain of a boundary
_SEGMENT_BLOCK = 1_000_000  # candidate segments evaluated at once (bounds memory)
_SEARCH_SCALES = (1 / 16, 1 / 4, 1.0)  # snapping radii tried, as fractions of max_snap_km
_LOCATE_CHUNK = 1_000_000  # points per STRtree in label (bounds memory, keeps the tree cheap)
_INSIDE, _SNAPPED, _NONE = 2, 1, 0  # per-level status; higher wins the anchor


def _polygon_parts(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty Polygons inside each geometry, collections flattened: (N,) -> (M,), (M,) index."""
    parts, index = shapely.get_parts(geoms, return_index=True)  # multi -> single, collection -> items
    multi = shapely.get_type_id(parts) == shapely.GeometryType.MULTIPOLYGON  # inside collections
    if multi.any():
        sub, sub_index = shapely.get_parts(parts[multi], return_index=True)
        parts = np.concatenate([parts[~multi], sub])
        index = np.concatenate([index[~multi], index[multi][sub_index]])
    keep = (shapely.get_type_id(parts) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(parts)
    return parts[keep], index[keep]


def _snap_to_world_bounds(geoms: np.ndarray) -> np.ndarray:
    """Geometries with coordinates within _BOUND_TOL_DEG of +-180 (x) or +-90 (y) set to the bound."""

    def snap(xy: np.ndarray) -> np.ndarray:
        out = xy.copy()
        for axis, bound in ((0, 180.0), (1, 90.0)):
            near = np.abs(np.abs(out[:, axis]) - bound) < _BOUND_TOL_DEG
            out[near, axis] = np.copysign(bound, out[near, axis])
        return out

    return shapely.transform(geoms, snap)


def cut_on_grid(geoms: np.ndarray, grid_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Polygons cut so that each piece lies in one cell of a ``grid_deg`` grid anchored at (-180, -90).

    geoms: (N,) Polygons (lon_deg, lat_deg). Returns the pieces (M,) and, per piece, the index
    of its polygon (M,). Pieces spanning several cells are halved at a grid line across their
    longer side, all at once per round, so each vertex is processed ~log2(cells) times. Clipping
    uses GEOS's rectangle clipper (shapely.clip_by_rect, ~20x faster than an overlay and no
    topology errors on invalid input). The pieces of a polygon tile it (shared cut edges).
    """
    if grid_deg <= 0:
        raise ValueError(f"grid_deg={grid_deg}: must be > 0 to cut")
    todo, rows = np.asarray(geoms, dtype=object), np.arange(len(geoms))
    done, done_rows = [], []
    for _ in range(_MAX_CUT_ROUNDS):
        if len(todo) == 0:
            break
        bounds = shapely.bounds(todo)
        first = np.floor((bounds[:, :2] - _ORIGIN) / grid_deg + _CELL_SLACK)
        last = np.ceil((bounds[:, 2:] - _ORIGIN) / grid_deg - _CELL_SLACK)
        span = np.maximum(last - first, 1.0)  # cells spanned in x and y
        fits = (span <= 1.0).all(axis=1)
        done.append(todo[fits])
        done_rows.append(rows[fits])
        todo, rows, bounds, first, span = todo[~fits], rows[~fits], bounds[~fits], first[~fits], span[~fits]
        axis = (span[:, 1] > span[:, 0]).astype(np.int64)  # halve the longer side
        at = np.arange(len(todo))
        line = first[at, axis] + np.floor(span[at, axis] / 2)  # grid line index
        # clip_by_rect takes one rectangle per call: clip all pieces cut along one line at once
        halves = np.empty(2 * len(todo), dtype=object)
        keys, group = np.unique(axis * (1 << 32) + line.astype(np.int64), return_inverse=True)
        for g, key in enumerate(keys):
            sel = np.flatnonzero(group == g)
            ax, cut = divmod(int(key), 1 << 32)
            cut = _ORIGIN[ax] + cut * grid_deg
            low, high = ((-181.0, -91.0, cut, 91.0), (cut, -91.0, 181.0, 91.0)) if ax == 0 else (
                (-181.0, -91.0, 181.0, cut), (-181.0, cut, 181.0, 91.0))
            halves[sel] = shapely.clip_by_rect(todo[sel], *low)
            halves[len(todo) + sel] = shapely.clip_by_rect(todo[sel], *high)
        todo, index = _polygon_parts(halves)
        rows = np.concatenate([rows, rows])[index]
    else:
        raise RuntimeError(f"cutting on a {grid_deg} deg grid did not finish in {_MAX_CUT_ROUNDS} rounds")
    return np.concatenate(done), np.concatenate(done_rows)


def _check_points(lat_deg: np.ndarray, lon_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) float64 lat, lon; ValueError naming the first bad point."""
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    if lat.ndim != 1 or lat.shape != lon.shape:
        raise ValueError(f"lat_deg {lat.shape} and lon_deg {lon.shape} must be 1-d of the same length")
    bad = ~(np.abs(lat) <= 90.0) | ~(np.abs(lon) <= 180.0)  # also catches NaN
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"point {i}: (lat_deg, lon_deg) = ({lat[i]}, {lon[i]}) is outside [-90, 90] x [-180, 180] "
            f"or not finite ({int(bad.sum())} bad point(s) in all)"
        )
    return lat, lon


def _cap_boxes(lat: np.ndarray, lon: np.ndarray, radius_km: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (lon/lat degrees) of the spherical caps of ``radius_km`` (scalar or (N,))
    around each point.

    (N,) -> boxes (M,), owner point index (M,), M >= N: a box crossing +-180 is split in two;
    a cap holding a pole spans all longitudes.
    """
    d = np.broadcast_to(np.asarray(radius_km, dtype=np.float64) / EARTH_RADIUS_KM, lat.shape)  # rad
    d_deg = np.degrees(d) + _BOUND_TOL_DEG
    polar = np.abs(lat) + d_deg >= 90.0
    # half-width in longitude of a cap of angular radius d at latitude lat: asin(sin d / cos lat)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sin(d) / np.cos(np.radians(lat))
    half = np.where(polar, 180.0, np.degrees(np.arcsin(np.clip(ratio, 0.0, 1.0))) + _BOUND_TOL_DEG)
    lo, hi = lon - half, lon + half
    full = polar | (hi - lo >= 360.0)
    lo, hi = np.where(full, -180.0, lo), np.where(full, 180.0, hi)
    south, north = np.maximum(lat - d_deg, -90.0), np.minimum(lat + d_deg, 90.0)
    west, east = np.flatnonzero(lo < -180.0), np.flatnonzero(hi > 180.0)  # parts beyond +-180
    xmin = np.concatenate([np.maximum(lo, -180.0), lo[west] + 360.0, np.full(len(east), -180.0)])
    xmax = np.concatenate([np.minimum(hi, 180.0), np.full(len(west), 180.0), hi[east] - 360.0])
    owner = np.concatenate([np.arange(len(lat)), west, east])
    return shapely.box(xmin, south[owner], xmax, north[owner]), owner


def _origin_to_segments(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """Distance from (0, 0) to each segment A-B: (N,) x 4 -> (N,)."""
    dx, dy = bx - ax, by - ay
    len2 = dx * dx + dy * dy
    t = np.clip(-(ax * dx + ay * dy) / np.where(len2 > 0, len2, 1.0), 0.0, 1.0)  # degenerate: t = 0
    return np.hypot(ax + t * dx, ay + t * dy)


class _Boundaries:
    """The boundaries of one level's pieces, indexed for "nearest polygon within a distance".

    Built from the pieces (their rings include the grid cut lines, which lie inside the
    polygons, so for a point outside a polygon the nearest ring point is still its nearest
    point). Rings are densified to _SEGMENT_DEG, so lon/lat-straight edges and great-circle
    arcs agree within metres, and split into chains of _CHAIN_SEGMENTS segments whose bounding
    boxes go into an STRtree. Not pickled: rebuilt from the pieces where needed.
    """

    def __init__(self, pieces: np.ndarray, piece_row: np.ndarray) -> None:
        rings, piece_of_ring = shapely.get_rings(pieces, return_index=True)
        rings = shapely.segmentize(rings, _SEGMENT_DEG)
        self.xy = shapely.get_coordinates(rings)  # (V, 2) lon, lat; rings one after another, closed
        n_vertex = shapely.get_num_coordinates(rings)
        ring_start = np.concatenate([[0], np.cumsum(n_vertex)[:-1]])
        n_chain = -(-(n_vertex - 1) // _CHAIN_SEGMENTS)  # ceil(segments / chain length)
        ring = np.repeat(np.arange(len(rings)), n_chain)
        local = np.arange(len(ring)) - np.repeat(np.cumsum(n_chain) - n_chain, n_chain)
        self.first = ring_start[ring] + local * _CHAIN_SEGMENTS  # (C,) first vertex of each chain
        self.n_seg = np.minimum(_CHAIN_SEGMENTS, n_vertex[ring] - 1 - local * _CHAIN_SEGMENTS)  # (C,)
        self.row = piece_row[piece_of_ring[ring]]  # (C,)
        last = self.first + self.n_seg
        x, y = self.xy[:, 0], self.xy[:, 1]
        # reduceat over [first_c, first_c+1) misses a chain's end vertex (the next one's first): add it
        bounds = [
            np.minimum(np.minimum.reduceat(x, self.first), x[last]),
            np.minimum(np.minimum.reduceat(y, self.first), y[last]),
            np.maximum(np.maximum.reduceat(x, self.first), x[last]),
            np.maximum(np.maximum.reduceat(y, self.first), y[last]),
        ] if len(ring) else [np.zeros(0)] * 4
        self.tree = shapely.STRtree(shapely.box(*bounds))

    def chain_km(self, lat: np.ndarray, lon: np.ndarray, point: np.ndarray, chain: np.ndarray) -> np.ndarray:
        """Great-circle km from point[i] (index into lat, lon) to chain[i]: (M,) pairs -> (M,).

        Vertices are projected onto the plane tangent to the sphere at the point (orthographic:
        a vertex at central angle c lands at sin(c) from the origin), where the distance to each
        segment is taken: exact at vertices, within a metre in between (segments are at most
        _SEGMENT_DEG long), and the antimeridian and the poles need no special case.
        """
        out = np.empty(len(point))
        sin0, cos0 = np.sin(np.radians(lat)), np.cos(np.radians(lat))
        n_vertex = self.n_seg[chain] + 1
        ends = np.cumsum(n_vertex)
        cuts = np.searchsorted(ends, np.arange(1, ends[-1] // _SEGMENT_BLOCK + 1) * _SEGMENT_BLOCK) if len(ends) else []
        for lo, hi in zip(np.concatenate([[0], cuts]).astype(int), np.concatenate([cuts, [len(point)]]).astype(int)):
            if lo >= hi:
                continue
            counts = n_vertex[lo:hi]
            offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
            vertex = np.repeat(self.first[chain[lo:hi]] - offset, counts) + np.arange(counts.sum())
            p = np.repeat(point[lo:hi], counts)
            phi = np.radians(self.xy[vertex, 1])
            dlam = np.radians(self.xy[vertex, 0] - lon[p])
            sin_phi, cos_phi, cos_dlam = np.sin(phi), np.cos(phi), np.cos(dlam)
            x = cos_phi * np.sin(dlam)
            y = cos0[p] * sin_phi - sin0[p] * cos_phi * cos_dlam
            front = sin0[p] * sin_phi + cos0[p] * cos_phi * cos_dlam > 0
            sin_c = _origin_to_segments(x[:-1], y[:-1], x[1:], y[1:])
            # a vertex on the far hemisphere folds onto the plane; the last vertex of a pair
            # and the first of the next make no segment
            valid = front[:-1] & front[1:]
            valid[offset[1:] - 1] = False
            seg_km = np.where(valid, EARTH_RADIUS_KM * np.arcsin(np.clip(sin_c, 0.0, 1.0)), np.inf)
            out[lo:hi] = np.minimum.reduceat(np.append(seg_km, np.inf), offset)
        return out

    def nearest_within(self, lat: np.ndarray, lon: np.ndarray, radius_km: float) -> tuple[np.ndarray, np.ndarray]:
        """Nearest polygon row within ``radius_km`` (great-circle) of each point outside the polygons.

        (N,) x 2 degrees -> row (N,) int64 (-1: none within), distance km (N,) (NaN: none).
        Searched at growing radii (_SEARCH_SCALES of radius_km): every chain whose box meets
        the bounding box of the cap of radius r is measured, and a point whose nearest chain is
        within r is done (all chains within r were measured). Ties go to the smaller row.
        """
        n = len(lat)
        out_row, out_km = np.full(n, _NO_ROW, dtype=np.int64), np.full(n, np.nan)
        todo = np.arange(n)
        for scale in _SEARCH_SCALES:
            if len(todo) == 0 or len(self.first) == 0:
                break
            r = radius_km * scale
            boxes, box_owner = _cap_boxes(lat[todo], lon[todo], r)
            box, chain = self.tree.query(boxes)  # bounding boxes overlap
            pair_point = todo[box_owner[box]]
            pair_km = self.chain_km(lat, lon, pair_point, chain)
            pair_row = self.row[chain]
            order = np.lexsort((pair_row, pair_km, pair_point))  # per point: nearest, then smallest row
            points, first_of_point = np.unique(pair_point[order], return_index=True)
            best = order[first_of_point]
            ok = pair_km[best] <= r
            out_row[points[ok]], out_km[points[ok]] = pair_row[best[ok]], pair_km[best[ok]]
            todo = todo[out_row[todo] < 0]
        return out_row, out_km


class PolygonLabeler:
    """Admin polygon per point and level (and city), vectorised; picklable and cheap to ship.

    admin_gdf: admin table in the geodata.admin.schema schema (validated with ``validate_admin``).
    grid_deg: cell size (deg) of the grid the polygons are cut on; 0 = no cut (parts only).
    max_snap_km: points in no polygon go to the nearest one within this distance; 0 = never.
    check_all_levels: look every point up at every level. Off (default), levels are looked up
        finest first and a point inside a finer polygon takes that polygon's ancestors at the
        coarser levels without a lookup (the labels are the same: the consistency rule below gives
        coarser levels the anchor's chain anyway), 1.4x faster. Such coarser levels get reason ""
        (counted as inside), so "snapped" and "overridden_by_<level>" at coarser levels are only
        seen for points that are not inside a finer polygon. Turn it on to count every
        disagreement between levels.
    """

    def __init__(self, admin_gdf: gpd.GeoDataFrame, *, grid_deg: float = 5.0, max_snap_km: float = 25.0,
                 check_all_levels: bool = False) -> None:
        if not (grid_deg == 0 or 0.1 <= grid_deg <= 360.0):
            raise ValueError(f"grid_deg={grid_deg}: use 0 (no cut) or a cell size in [0.1, 360] degrees")
        if not 0.0 <= max_snap_km <= MAX_SNAP_LIMIT_KM:
            raise ValueError(f"max_snap_km={max_snap_km}: must be in [0, {MAX_SNAP_LIMIT_KM:g}] km")
        if len(admin_gdf) == 0:
            raise ValueError("admin table is empty: no polygons to label with")
        validate_admin(admin_gdf)
        self.grid_deg = float(grid_deg)
        self.max_snap_km = float(max_snap_km)
        self.check_all_levels = bool(check_all_levels)

        table = admin_gdf.sort_values("code", kind="stable")  # row order = code order: ties -> min row
        self.codes = table["code"].astype(str).to_numpy(dtype=object)
        self.names = table["name"].astype(str).to_numpy(dtype=object)
        self.countries = table["country"].astype(str).to_numpy(dtype=object)
        row_level = table["level"].to_numpy(dtype=np.int64)
        self.levels: tuple[int, ...] = tuple(int(v) for v in np.unique(row_level))
        code_index = pd.Index(self.codes)
        parent = table["parent_code"].to_numpy(dtype=object)
        has_parent = ~pd.isna(parent)
        parent_row = np.full(len(table), _NO_ROW, dtype=np.int64)
        parent_row[has_parent] = code_index.get_indexer(parent[has_parent].astype(str))
        found = parent_row >= 0
        wrong = found & (row_level[np.maximum(parent_row, 0)] != row_level - 1)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ValueError(
                f"admin row code={self.codes[i]!r} (level {row_level[i]}): parent_code "
                f"{parent[i]!r} is a level-{row_level[parent_row[i]]} unit, expected level {row_level[i] - 1}"
            )
        self.parent_row = parent_row  # -1: level 0, or parent not in the table (broken chain)
        # ancestor[r, k]: row of r's ancestor at the k-th level of self.levels (-1: none / deeper)
        level_pos = np.searchsorted(self.levels, row_level)
        ancestor = np.full((len(table), len(self.levels)), _NO_ROW, dtype=np.int64)
        ancestor[np.arange(len(table)), level_pos] = np.arange(len(table))
        for k in range(len(self.levels) - 1, 0, -1):
            known = ancestor[:, k] >= 0
            up = np.full(len(table), _NO_ROW, dtype=np.int64)
            up[known] = parent_row[ancestor[known, k]]
            if self.levels[k - 1] == self.levels[k] - 1:  # parents are one level up, if that level exists
                ancestor[:, k - 1] = np.where(ancestor[:, k - 1] >= 0, ancestor[:, k - 1], up)
        self.ancestor = ancestor

        geoms = _snap_to_world_bounds(table.geometry.to_numpy())  # used as given: no repair
        self.stats: dict = {"n_rows": {}, "n_pieces": {}}
        self._pieces: list[np.ndarray] = []
        self._piece_row: list[np.ndarray] = []
        for k, level in enumerate(self.levels):
            rows = np.flatnonzero(level_pos == k)
            parts, index = _polygon_parts(geoms[rows])
            if self.grid_deg > 0:
                parts, cut_index = cut_on_grid(parts, self.grid_deg)
                index = index[cut_index]
            shapely.prepare(parts)
            self._pieces.append(parts)
            self._piece_row.append(rows[index])
            self.stats["n_rows"][level] = len(rows)
            self.stats["n_pieces"][level] = len(parts)
        self._init_caches()

    # ------------------------------------------------------------------ pickling

    def _init_caches(self) -> None:
        self._boundaries: dict[int, _Boundaries] = {}  # per level, built on first snap
        self._places_cache: tuple | None = None

    def __getstate__(self) -> dict:
        """Prepared arrays only (pieces as WKB); boundary indexes and the places cache are rebuilt lazily."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_boundaries", "_places_cache")}
        state["_pieces"] = [shapely.to_wkb(p) for p in self._pieces]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pieces = [shapely.from_wkb(w) for w in state["_pieces"]]
        for pieces in self._pieces:
            shapely.prepare(pieces)
        self._init_caches()

    def to_plain(self) -> dict:
        """The pickled state as plain values (geodata.labels.payload: shipped to Dask workers unpickled)."""
        return self.__getstate__()

    @classmethod
    def from_plain(cls, state: dict) -> PolygonLabeler:
        obj = cls.__new__(cls)
        obj.__setstate__(state)
        return obj

    # ------------------------------------------------------------------ labelling

    @property
    def level_names(self) -> tuple[str, ...]:
        """Names of the levels in the table, coarse to fine ("country", "region", "sub-region")."""
        return tuple(LEVEL_NAMES[level] for level in self.levels)

    def _locate(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per level, before consistency: row (L, N) int64 (-1), status (L, N) int8, snap km (L, N).

        In chunks of _LOCATE_CHUNK points (a shapely point costs ~200 bytes)."""
        if len(lat) > _LOCATE_CHUNK:
            parts = [
                self._locate(lat[i : i + _LOCATE_CHUNK], lon[i : i + _LOCATE_CHUNK])
                for i in range(0, len(lat), _LOCATE_CHUNK)
            ]
            return tuple(np.concatenate(arrays, axis=1) for arrays in zip(*parts))
        n, n_levels = len(lat), len(self.levels)
        row = np.full((n_levels, n), _NO_ROW, dtype=np.int64)
        status = np.full((n_levels, n), _NONE, dtype=np.int8)
        snap_km = np.full((n_levels, n), np.nan)
        if n == 0:
            return row, status, snap_km
        # lon = +180 and -180 are the same place: look such points up on both sides
        edge = np.flatnonzero(np.abs(lon) == 180.0)
        points = shapely.points(np.concatenate([lon, -lon[edge]]), np.concatenate([lat, lat[edge]]))
        owner = np.concatenate([np.arange(n), edge])
        todo = np.ones(len(points), dtype=bool)  # lookups still to make at this level
        for k in reversed(range(n_levels)):  # finest first
            if not self.check_all_levels and k < n_levels - 1:
                # A point inside a finer polygon whose chain reaches this level takes its ancestor here
                # (what _resolve would make of it anyway): only the others are looked up.
                deeper = row[k + 1 :]
                anc = np.full(n, _NO_ROW, dtype=np.int64)
                for kk in range(deeper.shape[0]):  # deepest inside level wins
                    r = deeper[kk]
                    ok = (status[k + 1 + kk] == _INSIDE) & (r >= 0)
                    anc = np.where(ok, self.ancestor[np.maximum(r, 0), k], anc)
                known = anc >= 0
                row[k, known], status[k, known] = anc[known], _INSIDE
                todo = ~known[owner]
            sub = np.flatnonzero(todo)
            if len(sub) == 0:
                continue
            tree = shapely.STRtree(points[sub])
            piece, point = tree.query(self._pieces[k], predicate="covers")
            best = np.full(n, len(self.codes), dtype=np.int64)
            np.minimum.at(best, owner[sub[point]], self._piece_row[k][piece])  # several: smallest code
            hit = best < len(self.codes)
            looked = np.zeros(n, dtype=bool)
            looked[owner[sub]] = True
            row[k, hit], status[k, hit] = best[hit], _INSIDE
            miss = np.flatnonzero(~hit & looked)
            if len(miss) and self.max_snap_km > 0:
                near, dist = self._nearest_within(k, lat[miss], lon[miss])
                ok = near >= 0
                row[k, miss[ok]], status[k, miss[ok]], snap_km[k, miss[ok]] = near[ok], _SNAPPED, dist[ok]
        return row, status, snap_km

    def _nearest_within(self, k: int, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest row of level k within max_snap_km of each point (outside all its polygons)."""
        if k not in self._boundaries:
            self._boundaries[k] = _Boundaries(self._pieces[k], self._piece_row[k])
        return self._boundaries[k].nearest_within(lat, lon, self.max_snap_km)

    def _resolve(
        self, row: np.ndarray, status: np.ndarray, snap_km: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Consistent rows along the parent chain (module docstring): final rows (L, N),
        reason codes (L, N) into self._reasons(), snap km (L, N) (NaN unless kept snapped)."""
        n_levels, n = row.shape
        cols = np.arange(n)
        key = np.where(status > _NONE, status.astype(np.int64) * n_levels + np.arange(n_levels)[:, None], -1)
        anchor = key.argmax(axis=0)  # deepest inside level, else deepest snapped
        has_anchor = key.max(axis=0) >= 0
        anchor_row = row[anchor, cols]
        # a finer snapped polygon inside the anchor's polygon refines it (deepest first)
        extended = np.zeros(n, dtype=bool)
        for k in range(n_levels - 1, 0, -1):
            up = self.ancestor[np.maximum(row[k], 0), anchor]
            take = has_anchor & ~extended & (k > anchor) & (row[k] >= 0) & (up == anchor_row)
            anchor = np.where(take, k, anchor)
            anchor_row = np.where(take, row[k], anchor_row)
            extended |= take

        final = np.full_like(row, _NO_ROW)
        for k in range(n_levels):
            chain = np.where(has_anchor & (k <= anchor), self.ancestor[np.maximum(anchor_row, 0), k], _NO_ROW)
            broken = has_anchor & (k < anchor) & (chain < 0)  # no parent in the table: keep our own
            final[k] = np.where(broken, row[k], chain)

        n_vocab = len(self.levels)
        reason = np.where(status == _INSIDE, 0, np.where(status == _SNAPPED, 1, 2))  # "", snapped, none
        same = final == row
        filled = ~same & (row < 0)
        overridden = ~same & (row >= 0) & (final >= 0)
        dropped = ~same & (row >= 0) & (final < 0)
        anchor_b = np.broadcast_to(anchor, row.shape)
        reason = np.where(filled, 3 + anchor_b, reason)
        reason = np.where(overridden, 3 + n_vocab + anchor_b, reason)
        reason = np.where(dropped, 3 + 2 * n_vocab + anchor_b, reason)
        kept_km = np.where(same & (status == _SNAPPED), snap_km, np.nan)
        return final, reason, kept_km

    def _reasons(self) -> np.ndarray:
        """Reason strings indexed by the codes of _resolve."""
        names = self.level_names
        return np.array(
            ["", "snapped", f"no_polygon_within_{self.max_snap_km:g}km"]
            + [f"from_{m}" for m in names]
            + [f"overridden_by_{m}" for m in names]
            + [f"disagrees_with_{m}" for m in names],
            dtype=object,
        )

    def rows(self, lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
        """Final polygon row per level (into ``codes``), -1 where unassigned: (N,) x 2 -> (L, N)."""
        lat, lon = _check_points(lat_deg, lon_deg)
        return self._resolve(*self._locate(lat, lon))[0]

    def label(self, lat_deg: np.ndarray, lon_deg: np.ndarray) -> pd.DataFrame:
        """Admin polygon of each point at each level: (N,) x 2 degrees -> DataFrame (N, 2 + 4 L + 1).

        Columns: lat_deg, lon_deg; then per level name (``level_names``) ``<name>_code``,
        ``<name>_name`` (str; missing (NaN) if unassigned), ``<name>_reason`` (str: "", "snapped",
        "no_polygon_within_<X>km", "from_<level>", "overridden_by_<level>",
        "disagrees_with_<level>"), ``<name>_snap_km`` (float, NaN unless snapped); last ``cc``:
        the ``country`` of the deepest assigned polygon (missing if none). RangeIndex.
        """
        lat, lon = _check_points(lat_deg, lon_deg)
        final, reason, snap_km = self._resolve(*self._locate(lat, lon))
        # string columns by Arrow take (-1 -> missing): ~40x faster than from object arrays
        codes, names, countries, vocab = (
            pd.array(v, dtype="str") for v in (self.codes, self.names, self.countries, self._reasons())
        )
        columns: dict[str, object] = {"lat_deg": lat, "lon_deg": lon}
        for k, name in enumerate(self.level_names):
            columns[f"{name}_code"] = codes.take(final[k], allow_fill=True)
            columns[f"{name}_name"] = names.take(final[k], allow_fill=True)
            columns[f"{name}_reason"] = vocab.take(reason[k])
            columns[f"{name}_snap_km"] = snap_km[k]
        deepest = np.full(len(lat), _NO_ROW, dtype=np.int64)
        for k in range(len(self.levels)):
            deepest = np.where(final[k] >= 0, final[k], deepest)
        columns["cc"] = countries.take(deepest, allow_fill=True)
        return pd.DataFrame(columns)

    # ------------------------------------------------------------------ cities

    def _places_index(self, places: pd.DataFrame) -> tuple[cKDTree, np.ndarray]:
        """cKDTree over (unit xyz, group offset) of the places, once per level they are labelled at,
        and the place index of each tree entry. Cached for the last places table (by content)."""
        missing = [c for c in ("lat", "lon", "name") if c not in places.columns]
        if missing:
            raise ValueError(f"places: missing column(s) {missing}; columns are {list(places.columns)}")
        lat, lon = parse_coordinates(places, "lat", "lon", source="places")
        digest = hashlib.sha1(lat.tobytes() + lon.tobytes()).hexdigest()
        if self._places_cache is None or self._places_cache[0] != digest:
            rows = self.rows(lat, lon)  # (L, P): each place's polygon at each level
            level_k, place = np.nonzero(rows >= 0)
            group = rows[level_k, place]
            data = np.column_stack([unit_xyz(lat[place], lon[place]), group * _GROUP_SPACING])
            self._places_cache = (digest, cKDTree(data), place)
        return self._places_cache[1], self._places_cache[2]

    def assign_cities(self, labels: pd.DataFrame, places: pd.DataFrame) -> pd.DataFrame:
        """Nearest place inside each point's deepest polygon: labels (N, C) -> (N, C + 6).

        labels: output of ``label`` (lat_deg, lon_deg, ``<level>_code``). places: the GeoNames
        table (lat, lon, name, ...; ``geodata.labels.geonames.default_labeler().places``), labelled
        once with these polygons (cached). The point's group is its deepest assigned polygon;
        if no place lies in it, its parent polygon ("from_<level>"); else none
        ("no_place_in_polygon"; "no_polygon" if the point has no polygon at all).
        Adds city_place (row of ``places``, -1), city_name (str, missing if none), city_lat_deg,
        city_lon_deg, city_dist_km (great-circle; NaN if none) and city_reason.
        """
        missing = [c for c in ("lat_deg", "lon_deg", *(f"{m}_code" for m in self.level_names)) if c not in labels]
        if missing:
            raise ValueError(f"labels: missing column(s) {missing}: pass the frame PolygonLabeler.label returned")
        tree, place_of_entry = self._places_index(places)
        n = len(labels)
        code_index = pd.Index(self.codes)
        group = np.full(n, _NO_ROW, dtype=np.int64)
        group_level = np.full(n, -1, dtype=np.int64)
        for k, name in enumerate(self.level_names):
            rows = code_index.get_indexer(labels[f"{name}_code"].to_numpy(dtype=object))
            group = np.where(rows >= 0, rows, group)
            group_level = np.where(rows >= 0, k, group_level)
        xyz = unit_xyz(labels["lat_deg"].to_numpy(np.float64), labels["lon_deg"].to_numpy(np.float64))

        entry = np.full(n, len(place_of_entry), dtype=np.int64)  # len: no place found
        chord = np.full(n, np.nan)
        # reason codes into vocab: 0 "", 1 no_place_in_polygon, 2 no_polygon, 3 + k from_<level k>
        vocab = ["", "no_place_in_polygon", "no_polygon"] + [f"from_{m}" for m in self.level_names]
        reason = np.where(group >= 0, 1, 2)
        parent = np.where(group >= 0, self.parent_row[np.maximum(group, 0)], _NO_ROW)
        for attempt, g in enumerate((group, parent)):
            todo = np.flatnonzero((entry == len(place_of_entry)) & (g >= 0))
            if len(todo) == 0:
                continue
            query = np.column_stack([xyz[todo], g[todo] * _GROUP_SPACING])
            # any place of another group is >= _GROUP_SPACING away; chords are <= 2
            dist, found = tree.query(query, k=1, distance_upper_bound=2.0 + 1e-9)
            ok = np.isfinite(dist)
            entry[todo[ok]], chord[todo[ok]] = found[ok], dist[ok]
            reason[todo[ok]] = 0 if attempt == 0 else 3 + group_level[todo[ok]] - 1
        has = entry < len(place_of_entry)
        place = np.full(n, _NO_ROW, dtype=np.int64)
        place[has] = place_of_entry[entry[has]]
        out = labels.copy()
        out["city_place"] = place
        out["city_name"] = pd.array(places["name"].to_numpy(dtype=object), dtype="str").take(place, allow_fill=True)
        out["city_lat_deg"] = np.where(has, places["lat"].to_numpy(np.float64)[place], np.nan)
        out["city_lon_deg"] = np.where(has, places["lon"].to_numpy(np.float64)[place], np.nan)
        # chord c between unit vectors -> central angle 2 asin(c / 2); clip: rounding can exceed 2
        out["city_dist_km"] = 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(chord / 2, 0.0, 1.0))
        out["city_reason"] = pd.array(vocab, dtype="str").take(reason)
        return out


def label_report(labels: pd.DataFrame) -> pd.DataFrame:
    """Counts per level from the ``<level>_reason`` columns of ``label`` (or of partitions concatenated).

    Index: level names found; columns n, inside, snapped, filled (from a finer level's chain),
    unassigned, overridden, dropped, disagreements (= overridden + dropped).
    """
    rows = {}
    for name in LEVEL_NAMES.values():
        col = f"{name}_reason"
        if col not in labels:
            continue
        reason = labels[col].astype(str)
        counts = {
            "n": len(reason),
            "inside": int((reason == "").sum()),
            "snapped": int((reason == "snapped").sum()),
            "filled": int(reason.str.startswith("from_").sum()),
            "unassigned": int(reason.str.startswith("no_polygon").sum()),
            "overridden": int(reason.str.startswith("overridden_by_").sum()),
            "dropped": int(reason.str.startswith("disagrees_with_").sum()),
        }
        counts["disagreements"] = counts["overridden"] + counts["dropped"]
        rows[name] = counts
    if not rows:
        raise ValueError(f"labels: no <level>_reason column; columns are {list(labels.columns)}")
    return pd.DataFrame.from_dict(rows, orient="index")


def label_partition(
    in_parquet: str | Path,
    out_parquet: str | Path,
    labeler: PolygonLabeler,
    *,
    places: pd.DataFrame | None = None,
) -> int:
    """Label one Parquet partition (columns id, latitude, longitude); returns the rows written.

    Writes ``id`` (unchanged) and the columns of ``labeler.label`` (plus those of
    ``assign_cities`` when ``places`` is given) to ``out_parquet`` atomically (temp file in the
    same folder, then os.replace; nothing is left behind on error). Raises ValueError naming the
    file and row of a missing column or a bad coordinate.
    """
    in_parquet = Path(in_parquet)
    names = pq.read_schema(in_parquet).names
    missing = [c for c in PARTITION_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{in_parquet}: missing column(s) {missing}; columns are {names}")
    frame = pd.read_parquet(in_parquet, columns=list(PARTITION_COLUMNS))
    lat, lon = parse_coordinates(frame, "latitude", "longitude", source=str(in_parquet))
    labels = labeler.label(lat, lon)
    if places is not None:
        labels = labeler.assign_cities(labels, places)
    labels.insert(0, "id", frame["id"].to_numpy())
    with atomic_write_path(out_parquet) as tmp:
        labels.to_parquet(tmp, index=False)
    return len(labels)
