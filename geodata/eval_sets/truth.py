"""The ground truth of any supported benchmark, with OSV-5M labels on every row.

``read_truth`` reads Im2GPS3k / YFCC4k / generic CSVs with geodata.eval_sets.benchmark_csv
(latitude/longitude order decided and explained, bad rows quarantined with their line) and
labels them with the nearest GeoNames place (``geodata.labels.geonames_csv.label_frame``, the
way OSV-5M labelled its release); an OSV-5M ``test.csv`` (or the authors' ``select.csv``) keeps
its own labels (``read_osv5m_truth``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geodata.eval_sets.benchmark_csv import (
    LATLON_ORDERS,
    detect_format,
    quarantine_entry,
    quarantine_table,
    read_geo_benchmark,
)
from geodata.labels.geonames_csv import label_frame
from geodata.osv5m import LABEL_COLUMNS, UNIQUE_COLUMNS, unique_keys

#: Formats ``read_truth`` reads ("auto" decides from the header and the file name).
EVAL_FORMATS: tuple[str, ...] = ("auto", "im2gps3k", "yfcc4k", "generic", "osv5m")

#: Column names accepted for an OSV-5M truth file: the release's ``test.csv`` names first,
#: then those of the OSV-5M authors' ``game/select.csv`` (the same test rows).
OSV5M_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "latitude": ("latitude", "true_lat"),
    "longitude": ("longitude", "true_lon"),
    "country": ("country",),
    "region": ("region",),
    "sub-region": ("sub-region", "area"),
    "city": ("city",),
}


@dataclass(frozen=True)
class Truth:
    """A benchmark's ground truth, read and labelled.

    rows: (N,) id, image, latitude, longitude, country, region, sub-region, city (GeoNames
    labels, "" when empty) and the four unique_* keys, in file order. quarantine: bad rows
    (file, line, field, reason, value), one entry per bad field. n_data_rows: data lines read.
    """

    rows: pd.DataFrame
    quarantine: pd.DataFrame
    fmt: str
    swapped: bool
    swap_evidence: str
    n_data_rows: int


def _osv5m_columns(header: Sequence[str]) -> dict[str, str] | None:
    """{canonical name: header column} when ``header`` has every OSV5M_ALIASES entry, else None."""
    found = {}
    for name, aliases in OSV5M_ALIASES.items():
        col = next((a for a in aliases if a in header), None)
        if col is None:
            return None
        found[name] = col
    return found


def detect_eval_format(meta_csv: Path) -> str:
    """"osv5m" when the header has OSV-5M's id, coordinates and label columns; else the
    benchmark named in the file name (geodata.eval_sets.benchmark_csv.detect_format)."""
    with open(meta_csv, encoding="utf-8-sig", newline="") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    return "osv5m" if _osv5m_columns(header) else detect_format(Path(meta_csv))


def _checked_rows(
    path: Path, df: pd.DataFrame, cols: dict[str, str]
) -> tuple[pd.Series, dict[str, np.ndarray], np.ndarray, list[dict]]:
    """(stripped ids, {latitude, longitude: float64 values}, rows to keep, quarantine entries) of
    an OSV-5M truth file read as text: an empty id, a coordinate that is not a finite number in
    range, or a repeated id (first kept) is bad."""
    line = np.arange(len(df)) + 2
    bad: list[dict] = []

    def quarantine(mask: np.ndarray, field: str, reason: str, values: pd.Series) -> None:
        for i in np.flatnonzero(mask):
            bad.append(quarantine_entry(path, int(line[i]), field, reason, str(values.iloc[i])[:200]))

    ids = df[cols["id"]].str.strip()
    ok = ids.ne("").to_numpy().copy()  # pandas hands out read-only views
    quarantine(~ok, cols["id"], "empty id", df[cols["id"]])
    coords = {}
    for what, limit in (("latitude", 90.0), ("longitude", 180.0)):
        text = df[cols[what]]
        value = pd.to_numeric(text.str.strip(), errors="coerce").to_numpy(np.float64)
        nan = ~np.isfinite(value)
        out = np.isfinite(value) & (np.abs(value) > limit)
        quarantine(nan, cols[what], f"{what} is not a finite number", text)
        quarantine(out, cols[what], f"{what} outside [-{limit:g}, {limit:g}]", text)
        ok &= ~nan & ~out
        coords[what] = value
    dup = ids.duplicated(keep="first").to_numpy() & ok
    if dup.any():
        first = {v: int(line[i]) for i, v in reversed(list(enumerate(ids)))}
        for i in np.flatnonzero(dup):
            reason = f"duplicate id, kept line {first[ids.iloc[i]]}"
            bad.append(quarantine_entry(path, int(line[i]), cols["id"], reason, ids.iloc[i]))
    return ids, coords, ok & ~dup, bad


def read_osv5m_truth(path: Path, max_bad_fraction: float = 0.05) -> Truth:
    """OSV-5M ground truth (a release ``test.csv``, or the authors' ``select.csv``) -> Truth.

    Every column is read as text (ids exact, Namibia's "NA" kept). Rows with an empty id,
    a coordinate that is not a finite number in range, or a repeated id (first kept) are
    quarantined with their file line (header = line 1; no field spans lines in the release).
    The file's unique_* columns are used when present, else built from the labels as the
    release does. Raises ValueError naming the file when columns are missing or more than
    ``max_bad_fraction`` of the rows are bad.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file, expected an OSV-5M test.csv header") from None
    cols = _osv5m_columns(list(df.columns))
    if cols is None:
        need = [" or ".join(a) for a in OSV5M_ALIASES.values()]
        raise ValueError(f"{path}, line 1: an OSV-5M truth file needs columns {need}; columns are {list(df.columns)}")
    if not len(df):
        raise ValueError(f"{path}: no data rows after the header")
    ids, coords, ok, bad = _checked_rows(path, df, cols)
    quarantined = quarantine_table(path, bad, len(df), max_bad_fraction, "Fix the file or raise max_bad_fraction")
    kept = df[ok].reset_index(drop=True)
    rows = pd.DataFrame({"id": ids[ok].to_numpy(), "image": ids[ok].to_numpy() + ".jpg",
                         "latitude": coords["latitude"][ok], "longitude": coords["longitude"][ok]})
    for name in LABEL_COLUMNS:
        rows[name] = kept[cols[name]].to_numpy()
    if all(c in kept.columns for c in UNIQUE_COLUMNS):
        for c in UNIQUE_COLUMNS:
            rows[c] = kept[c].to_numpy()
    else:
        keys = unique_keys(*(rows[c] for c in LABEL_COLUMNS))
        for c in UNIQUE_COLUMNS:
            rows[c] = keys[c].to_numpy()
    evidence = "as-labelled: OSV-5M files name their latitude and longitude columns correctly"
    return Truth(rows, quarantined, "osv5m", False, evidence, len(df))


def read_truth(meta_csv: Path, fmt: str = "auto", latlon_order: str = "auto", max_bad_fraction: float = 0.05) -> Truth:
    """Ground truth of any supported benchmark, with OSV-5M labels on every row."""
    meta_csv = Path(meta_csv)
    if fmt not in EVAL_FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {list(EVAL_FORMATS)}")
    if latlon_order not in LATLON_ORDERS:
        raise ValueError(f"latlon_order {latlon_order!r}: expected one of {list(LATLON_ORDERS)}")
    if not meta_csv.is_file():
        raise FileNotFoundError(f"{meta_csv}: benchmark metadata CSV not found")
    if fmt == "auto":
        fmt = detect_eval_format(meta_csv)
    if fmt == "osv5m":
        if latlon_order == "swapped":
            raise ValueError("latlon_order='swapped' does not apply to OSV-5M files (their columns are right); "
                             "it is for im2gps3k / yfcc4k / generic CSVs")
        return read_osv5m_truth(meta_csv, max_bad_fraction)
    table = read_geo_benchmark(meta_csv, fmt=fmt, latlon_order=latlon_order, max_bad_fraction=max_bad_fraction)
    rows = label_frame(table.rows)  # the truth's OSV-5M labels, as the release was labelled
    n_data = len(table.rows) + int(table.quarantine["line"].nunique())
    return Truth(rows, table.quarantine, table.fmt, table.swapped, table.swap_evidence, n_data)

