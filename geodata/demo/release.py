"""The demo's tables: labelled rows in the OSV-5M release layout, written as release CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geodata.atomic import write_text_atomic
from geodata.labels.geonames_csv import label_frame
from geodata.osv5m import LABEL_COLUMNS, OSV5M_COLUMNS, UNIQUE_COLUMNS


def format_coord(values: np.ndarray) -> list[str]:
    """Shortest positional text that parses back to the same float64 (no exponent)."""
    return [np.format_float_positional(v, unique=True, trim="-") for v in values.tolist()]


def release_frame(
    ids: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray
) -> pd.DataFrame:
    """Labelled rows in OSV5M_COLUMNS order: id int64, coordinates float64, strings elsewhere.

    Labels come from label_frame; underivable columns and a missing unique_sub-region are "".
    """
    base = pd.DataFrame(
        {"id": np.asarray(ids, dtype=np.int64), "latitude": lat_deg, "longitude": lon_deg}
    )
    labelled = label_frame(base, lat_col="latitude", lon_col="longitude")
    out = pd.DataFrame({"id": base["id"], "latitude": base["latitude"], "longitude": base["longitude"]})
    for col in OSV5M_COLUMNS[3:]:
        if col in LABEL_COLUMNS or col in UNIQUE_COLUMNS:
            # unique_sub-region is missing (None/NaN) without a sub-region: release writes "".
            values = labelled[col].astype(object).where(labelled[col].notna(), "")
            out[col] = values.astype(str).to_numpy(dtype=object)
        else:
            out[col] = ""
    return out[list(OSV5M_COLUMNS)]


def write_release_csv(path: Path, frame: pd.DataFrame) -> None:
    """Atomically write ``frame`` as a release CSV (coordinates in exact shortest text).

    Reading it back with ``keep_default_na=False`` returns the same strings ("NA" stays).
    """
    text = frame.astype({"latitude": object, "longitude": object}).assign(
        latitude=format_coord(frame["latitude"].to_numpy()),
        longitude=format_coord(frame["longitude"].to_numpy()),
    )
    write_text_atomic(text.to_csv(index=False, lineterminator="\n"), path)
