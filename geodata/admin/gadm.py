"""GADM 4.1 admin polygons, read into the geodata.admin.schema schema.

GADM's licence is non-commercial: read it where users bring it, never ship it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyogrio

from geodata.admin.schema import LEVEL_NAMES, alpha2, finish_admin, new_report, read_columns, to_wgs84


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
        frame = to_wgs84(read_columns(path, columns, layer=layer), where, report)
        parts.append(
            gpd.GeoDataFrame(
                {
                    "level": level,
                    "code": frame[code],
                    "name": frame[name],
                    "parent_code": None if level == 0 else frame[f"GID_{level - 1}"],
                    "country": alpha2(frame["GID_0"]),
                },
                geometry=frame.geometry,
            )
        )
    return finish_admin(pd.concat(parts, ignore_index=True), "gadm", report)
