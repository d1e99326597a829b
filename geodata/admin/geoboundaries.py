"""geoBoundaries admin polygons (per-country files or the CGAZ composites), read into the
geodata.admin.schema schema. geoBoundaries gbOpen is CC BY 4.0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from geodata.admin.schema import alpha2, finish_admin, new_report, to_wgs84

log = logging.getLogger(__name__)

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
        frame = to_wgs84(frame, path.name, report)
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
    units["country"] = alpha2(units["shapeGroup"])
    return finish_admin(units, "geoboundaries", report)
