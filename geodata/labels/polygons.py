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
  of radius 6371 km, to the polygon's boundary (geodata.labels.polygon_boundaries: exact at its
  vertices, within a metre between them). Ties go to the smallest code.
- Consistency between levels (parent_code chain). Each point's anchor is its deepest level
  assigned from inside a polygon, else its deepest snapped level. Coarser levels take the
  anchor's ancestors; a finer snapped level whose ancestor at the anchor's level is the anchor
  becomes the anchor (and fills the levels between); other finer ones are dropped. Reasons:
  "from_<level>" (was unassigned, filled from that level's chain), "overridden_by_<level>"
  (had another polygon: a disagreement), "disagrees_with_<level>" (a finer polygon outside the
  anchor, dropped: a disagreement). Where a chain is broken (a parent missing from the table)
  the level keeps its own polygon (geodata.labels.polygon_levels).
  ``geodata.labels.polygon_partition.label_report`` counts all this.
- Antimeridian and poles. Natural Earth stores polygons crossing +-180 as parts split there,
  and noisy coordinates such as -179.99999999999991 or -89.99999999999994: coordinates within
  1e-9 deg of +-180 / +-90 are set to the bound when preparing. A point at lon = +-180 is
  looked up at both +180 and -180 (the same place). A point at a pole lies on a polygon edge
  along lat = +-90 whatever its lon; a polygon that stops short of the pole is reached by
  snapping, where the pole is one point.

Speed: polygons are split into parts and, with ``grid_deg`` > 0, cut on a grid
(geodata.labels.polygon_pieces), so each piece is small. ``label`` builds one STRtree on the
points and queries it with each level's pieces (``predicate="covers"``), which is ~15x faster
than a tree of polygons queried with points.

Cities: ``PolygonLabeler.assign_cities`` picks the nearest GeoNames place inside the point's
deepest polygon, labelling the places themselves once with the same polygons.
"""

from __future__ import annotations

import hashlib
import logging

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree

from geodata.admin.schema import LEVEL_NAMES, validate_admin
from geodata.labels.coordinates import parse_coordinates
from geodata.labels.hierarchy import unit_xyz
from geodata.labels.polygon_boundaries import Boundaries
from geodata.labels.polygon_levels import (
    INSIDE,
    NO_ROW,
    NONE,
    SNAPPED,
    ancestor_table,
    parent_rows,
    reason_names,
    resolve_levels,
)
from geodata.labels.polygon_pieces import cut_on_grid, polygon_parts, snap_to_world_bounds
from geodata.osv5m import EARTH_RADIUS_KM
from geodata.progress import Progress

log = logging.getLogger(__name__)

#: Largest accepted max_snap_km: snapping measures every boundary chain in the cap's bounding
#: box, so its cost grows with the cap's area; beyond this it is no longer border noise.
MAX_SNAP_LIMIT_KM = 500.0
_GROUP_SPACING = 4.0  # > 2, the largest chord between unit vectors: keeps kd-tree groups apart
_LOCATE_CHUNK = 1_000_000  # points per STRtree in label (bounds memory, keeps the tree cheap)


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
        # -1: level 0, or parent not in the table (broken chain)
        self.parent_row = parent_rows(self.codes, table["parent_code"].to_numpy(dtype=object), row_level)
        level_pos = np.searchsorted(self.levels, row_level)
        # ancestor[r, k]: row of r's ancestor at the k-th level of self.levels (-1: none / deeper)
        self.ancestor = ancestor_table(self.parent_row, level_pos, self.levels)

        geoms = snap_to_world_bounds(table.geometry.to_numpy())  # used as given: no repair
        self.stats: dict = {"n_rows": {}, "n_pieces": {}}
        self._pieces: list[np.ndarray] = []
        self._piece_row: list[np.ndarray] = []
        with Progress(len(table), "cutting admin polygons into pieces", unit="polygons", logger=log) as bar:
            for k, level in enumerate(self.levels):
                rows = np.flatnonzero(level_pos == k)
                parts, index = polygon_parts(geoms[rows])
                if self.grid_deg > 0:
                    parts, cut_index = cut_on_grid(parts, self.grid_deg)
                    index = index[cut_index]
                shapely.prepare(parts)
                self._pieces.append(parts)
                self._piece_row.append(rows[index])
                self.stats["n_rows"][level] = len(rows)
                self.stats["n_pieces"][level] = len(parts)
                bar.update(len(rows))
        self._init_caches()

    # ------------------------------------------------------------------ pickling

    def _init_caches(self) -> None:
        self._boundaries: dict[int, Boundaries] = {}  # per level, built on first snap
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
        row = np.full((n_levels, n), NO_ROW, dtype=np.int64)
        status = np.full((n_levels, n), NONE, dtype=np.int8)
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
                # (what resolve_levels would make of it anyway): only the others are looked up.
                deeper = row[k + 1 :]
                anc = np.full(n, NO_ROW, dtype=np.int64)
                for kk in range(deeper.shape[0]):  # deepest inside level wins
                    r = deeper[kk]
                    ok = (status[k + 1 + kk] == INSIDE) & (r >= 0)
                    anc = np.where(ok, self.ancestor[np.maximum(r, 0), k], anc)
                known = anc >= 0
                row[k, known], status[k, known] = anc[known], INSIDE
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
            row[k, hit], status[k, hit] = best[hit], INSIDE
            miss = np.flatnonzero(~hit & looked)
            if len(miss) and self.max_snap_km > 0:
                near, dist = self._nearest_within(k, lat[miss], lon[miss])
                ok = near >= 0
                row[k, miss[ok]], status[k, miss[ok]], snap_km[k, miss[ok]] = near[ok], SNAPPED, dist[ok]
        return row, status, snap_km

    def _nearest_within(self, k: int, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest row of level k within max_snap_km of each point (outside all its polygons)."""
        if k not in self._boundaries:
            self._boundaries[k] = Boundaries(self._pieces[k], self._piece_row[k])
        return self._boundaries[k].nearest_within(lat, lon, self.max_snap_km)

    def rows(self, lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
        """Final polygon row per level (into ``codes``), -1 where unassigned: (N,) x 2 -> (L, N)."""
        lat, lon = _check_points(lat_deg, lon_deg)
        return resolve_levels(*self._locate(lat, lon), self.ancestor)[0]

    def label(self, lat_deg: np.ndarray, lon_deg: np.ndarray) -> pd.DataFrame:
        """Admin polygon of each point at each level: (N,) x 2 degrees -> DataFrame (N, 2 + 4 L + 1).

        Columns: lat_deg, lon_deg; then per level name (``level_names``) ``<name>_code``,
        ``<name>_name`` (str; missing (NaN) if unassigned), ``<name>_reason`` (str: "", "snapped",
        "no_polygon_within_<X>km", "from_<level>", "overridden_by_<level>",
        "disagrees_with_<level>"), ``<name>_snap_km`` (float, NaN unless snapped); last ``cc``:
        the ``country`` of the deepest assigned polygon (missing if none). RangeIndex.
        """
        lat, lon = _check_points(lat_deg, lon_deg)
        final, reason, snap_km = resolve_levels(*self._locate(lat, lon), self.ancestor)
        # string columns by Arrow take (-1 -> missing): ~40x faster than from object arrays
        codes, names, countries, vocab = (
            pd.array(v, dtype="str") for v in (self.codes, self.names, self.countries, reason_names(self.level_names, self.max_snap_km))
        )
        columns: dict[str, object] = {"lat_deg": lat, "lon_deg": lon}
        for k, name in enumerate(self.level_names):
            columns[f"{name}_code"] = codes.take(final[k], allow_fill=True)
            columns[f"{name}_name"] = names.take(final[k], allow_fill=True)
            columns[f"{name}_reason"] = vocab.take(reason[k])
            columns[f"{name}_snap_km"] = snap_km[k]
        deepest = np.full(len(lat), NO_ROW, dtype=np.int64)
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
        group = np.full(n, NO_ROW, dtype=np.int64)
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
        parent = np.where(group >= 0, self.parent_row[np.maximum(group, 0)], NO_ROW)
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
        place = np.full(n, NO_ROW, dtype=np.int64)
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

