"""Label image locations with the four OSV-5M label columns, by either labeler, in parallel.

- ``geonames``: the OSV-5M method, nearest GeoNames cities1000 place
  (geodata.geonames, identical to reverse_geocoder);
- ``polygons``: point-in-polygon against administrative polygons
  (geodata.polygon_labeler), cities the nearest GeoNames place inside the sub-region.

Both produce the columns the entity table is built from (country, region, sub-region,
city, as in OSV-5M's CSVs) and run over Parquet partitions with Dask
(geodata.parallel.map_partitions): the labeler is broadcast once, each worker reads its
own partition.
"""

from __future__ import annotations

import pandas as pd

from geodata.geonames import GeoNamesLabeler, label_frame
from geodata.osv5m import LABEL_COLUMNS


def geonames_partition(df: pd.DataFrame, labeler: GeoNamesLabeler | None) -> pd.DataFrame:
    """One partition (id, latitude, longitude) -> id + the OSV-5M label columns."""
    out = label_frame(df[["id", "latitude", "longitude"]], labeler=labeler)
    return out[["id", *LABEL_COLUMNS]]
