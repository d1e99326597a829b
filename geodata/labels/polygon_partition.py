"""Polygon labels of a Parquet partition (what a Dask worker runs), and the counts per level
of a labelled frame's reasons (geodata.labels.polygons)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from geodata.admin.schema import LEVEL_NAMES
from geodata.atomic import atomic_write_path
from geodata.labels.coordinates import parse_coordinates
from geodata.labels.polygons import PolygonLabeler

#: Columns of a partition read by label_partition.
PARTITION_COLUMNS: tuple[str, ...] = ("id", "latitude", "longitude")


def label_report(labels: pd.DataFrame) -> pd.DataFrame:
    """Counts per level from the ``<level>_reason`` columns of ``label`` (or of partitions concatenated).

    Index: level names found; columns n, inside, snapped, filled (from a finer level's chain),
    unassigned, overridden, dropped, disagreements (= overridden + dropped).
    """
    rows = {}
    for name in LEVEL_NAMES.values():
        col = f"{name}_reason"
        if col not in labels:
            continue
        reason = labels[col].astype(str)
        counts = {
            "n": len(reason),
            "inside": int((reason == "").sum()),
            "snapped": int((reason == "snapped").sum()),
            "filled": int(reason.str.startswith("from_").sum()),
            "unassigned": int(reason.str.startswith("no_polygon").sum()),
            "overridden": int(reason.str.startswith("overridden_by_").sum()),
            "dropped": int(reason.str.startswith("disagrees_with_").sum()),
        }
        counts["disagreements"] = counts["overridden"] + counts["dropped"]
        rows[name] = counts
    if not rows:
        raise ValueError(f"labels: no <level>_reason column; columns are {list(labels.columns)}")
    return pd.DataFrame.from_dict(rows, orient="index")


def label_partition(
    in_parquet: str | Path,
    out_parquet: str | Path,
    labeler: PolygonLabeler,
    *,
    places: pd.DataFrame | None = None,
) -> int:
    """Label one Parquet partition (columns id, latitude, longitude); returns the rows written.

    Writes ``id`` (unchanged) and the columns of ``labeler.label`` (plus those of
    ``assign_cities`` when ``places`` is given) to ``out_parquet`` atomically (temp file in the
    same folder, then os.replace; nothing is left behind on error). Raises ValueError naming the
    file and row of a missing column or a bad coordinate.
    """
    in_parquet = Path(in_parquet)
    names = pq.read_schema(in_parquet).names
    missing = [c for c in PARTITION_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{in_parquet}: missing column(s) {missing}; columns are {names}")
    frame = pd.read_parquet(in_parquet, columns=list(PARTITION_COLUMNS))
    lat, lon = parse_coordinates(frame, "latitude", "longitude", source=str(in_parquet))
    labels = labeler.label(lat, lon)
    if places is not None:
        labels = labeler.assign_cities(labels, places)
    labels.insert(0, "id", frame["id"].to_numpy())
    with atomic_write_path(out_parquet) as tmp:
        labels.to_parquet(tmp, index=False)
    return len(labels)
