"""Rows whose coordinates contradict their own country label: `label_mismatch`.

OSV-5M labelled every row with reverse_geocoder (the nearest GeoNames cities1000 place)
on the row's own coordinates (DATA.md), so the GeoNames country of a row's (latitude,
longitude) is its `country` label unless one of them was changed afterwards: latitude
and longitude swapped, a sign lost, a label edited. Measured on the real sample
(shared/osv5m-sample/select.csv): 0 of 50 rows disagree; with latitude and longitude
swapped, 48 of 50 do. The check is the same whatever labeler the hierarchy uses: the
label was made by GeoNames, so GeoNames is what it must agree with (polygons differ from
it near borders on correct rows: `country_differs_from_geonames` in the hierarchy report).

Rows with an empty country are not checked (nothing to contradict). Namibia's "NA" is a
string throughout (manifests keep it; places are read with NA parsing off).

The hierarchy stage leaves such rows out of the entity table, gives them no entity at
any level (so training skips them) and writes them to its own quarantine file
(QUARANTINE_COLUMNS of geodata.ingest.quarantine, reason "label_mismatch", field "country").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from geodata.atomic import write_parquet_atomic
from geodata.ingest.quarantine import QUARANTINE_COLUMNS, QUARANTINE_SCHEMA, truncate
from geodata.labels.geonames import GeoNamesLabeler, default_labeler
from geodata.osv5m import LEVELS

log = logging.getLogger(__name__)

LABEL_MISMATCH = "label_mismatch"


@dataclass
class LabelCheck:
    """One split's check: mask (n,) bool of mismatched rows, and their quarantine rows."""

    mask: np.ndarray
    quarantine: pd.DataFrame

    @property
    def n(self) -> int:
        return int(self.mask.sum())


def country_mismatch(manifest: pd.DataFrame, labeler: GeoNamesLabeler | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((n,) bool rows whose non-empty `country` is not the GeoNames country of their
    coordinates, (n,) int64 index of each row's nearest place in labeler.places)."""
    labeler = labeler or default_labeler()
    if not len(manifest):
        return np.zeros(0, bool), np.zeros(0, np.int64)
    place = labeler.nearest(manifest["latitude"].to_numpy(np.float64), manifest["longitude"].to_numpy(np.float64))
    label = manifest["country"].fillna("").astype(str).to_numpy()
    return (label != "") & (label != labeler.place_column("cc")[place]), place


def check_labels(manifest: pd.DataFrame, split: str, file: str | np.ndarray,
                 labeler: GeoNamesLabeler | None = None) -> LabelCheck:
    """`country_mismatch` of one split's manifest, with quarantine rows naming file, line and both countries.

    file: the input file of every row (a CSV name) or (n,) names (WebDataset shards).
    """
    labeler = labeler or default_labeler()
    mask, place = country_mismatch(manifest, labeler)
    rows = np.flatnonzero(mask)
    bad = manifest.iloc[rows]
    files = np.broadcast_to(np.asarray(file, dtype=object), (len(manifest),))[rows]
    cc, name = labeler.place_column("cc")[place[rows]], labeler.place_column("name")[place[rows]]
    values = [truncate(f"country {c!r}, but ({la}, {lo}) is nearest to {n} in {g!r}")
              for c, la, lo, n, g in zip(bad["country"], bad["latitude"], bad["longitude"], name, cc, strict=True)]
    quarantine = pd.DataFrame({
        "split": split, "file": files, "line": bad["line"].to_numpy(np.int64), "id": bad["id"].astype(str).to_numpy(),
        "field": "country", "reason": LABEL_MISMATCH, "value": values,
    }, columns=list(QUARANTINE_COLUMNS))
    if len(rows):
        log.warning("%s: %d rows whose coordinates contradict their country label (%s), e.g. %s line %s: %s",
                    split, len(rows), LABEL_MISMATCH, files[0], int(bad["line"].iloc[0]), values[0])
    return LabelCheck(mask, quarantine)


def check_ingested_labels(ingest_dir: Path, manifests: dict[str, pd.DataFrame]) -> dict[str, LabelCheck]:
    """`check_labels` of every split of an ingest folder (file names from its layout)."""
    report = Path(ingest_dir) / "ingest_report.json"
    layout = json.loads(report.read_text()).get("layout", "csv") if report.is_file() else "csv"
    return {split: check_labels(m, split, m["image_container"].to_numpy(object) if layout == "webdataset"
                                else f"{split}.csv") for split, m in manifests.items()}


def unassign(assigned: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """geodata.labels.hierarchy.assign_images' table with no entity (-1) at any level for rows in `mask`."""
    out = assigned.copy()
    for level in LEVELS:
        out.loc[mask, [f"{level}_id", f"{level}_index"]] = -1
    return out


def write_label_quarantine(checks: dict[str, LabelCheck], path: Path) -> Path:
    """Write all splits' label_mismatch rows to `path` (QUARANTINE_SCHEMA Parquet, atomic)."""
    frames = [c.quarantine for c in checks.values()]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(QUARANTINE_COLUMNS))
    table = pa.Table.from_pandas(frame.astype({"line": np.int64}), schema=QUARANTINE_SCHEMA, preserve_index=False)
    write_parquet_atomic(table, path)
    return Path(path)
