"""The OSV-5M release format: column order, label columns and the unique-key rules.

One place knows these facts (DATA.md); every reader, writer and labeler imports them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: train.csv / test.csv columns, in release order (32).
OSV5M_COLUMNS: tuple[str, ...] = (
    "id", "latitude", "longitude", "thumb_original_url", "country", "sequence",
    "captured_at", "lon_bin", "lat_bin", "cell", "region", "sub-region", "city",
    "land_cover", "road_index", "drive_side", "climate", "soil", "dist_sea",
    "quadtree_10_5000", "quadtree_10_25000", "quadtree_10_1000", "quadtree_10_50000",
    "quadtree_10_12500", "quadtree_10_500", "quadtree_10_2500",
    "unique_region", "unique_sub-region", "unique_city", "unique_country",
    "creator_username", "creator_id",
)

#: Raw label columns (GeoNames cc, admin1, admin2, place name).
LABEL_COLUMNS: tuple[str, ...] = ("country", "region", "sub-region", "city")

#: Composite label keys, in hierarchy order (country first).
UNIQUE_COLUMNS: tuple[str, ...] = (
    "unique_country", "unique_region", "unique_sub-region", "unique_city",
)

#: Hierarchy levels, coarse to fine; index = level number used everywhere.
LEVELS: tuple[str, ...] = ("country", "region", "subregion", "city")

#: Placeholder the release writes for a missing sub-region inside unique_city.
MISSING_SUBREGION_TOKEN = "NaN"

#: Sphere radius (km) of the benchmark's haversine (OSV-5M's metric code: R = 6371 km): geodata's
#: one Earth radius (hierloc.geometry.geo states the same value for the torch side).
EARTH_RADIUS_KM = 6371.0


def unique_keys(
    cc: pd.Series, admin1: pd.Series, admin2: pd.Series, name: pd.Series
) -> pd.DataFrame:
    """Build the OSV-5M unique_* columns from GeoNames labels, as the release does.

    unique_country = cc; unique_region = admin1_cc;
    unique_sub-region = admin2_admin1_cc, or missing (None) when admin2 is empty;
    unique_city = name_<admin2 or "NaN">_admin1_cc.

    Inputs are string Series of equal length ("" for a missing admin field).
    Returns a DataFrame with the four UNIQUE_COLUMNS (object dtype).
    """
    cc = cc.astype(str).to_numpy(dtype=object)
    admin1 = admin1.astype(str).to_numpy(dtype=object)
    admin2 = admin2.astype(str).to_numpy(dtype=object)
    name = name.astype(str).to_numpy(dtype=object)
    region = admin1 + "_" + cc
    has_sub = admin2 != ""
    sub = np.where(has_sub, admin2 + "_" + region, None)
    city = name + "_" + np.where(has_sub, admin2, MISSING_SUBREGION_TOKEN) + "_" + region
    return pd.DataFrame(
        {
            "unique_country": cc,
            "unique_region": region,
            "unique_sub-region": sub,
            "unique_city": city,
        }
    )
