"""Readers for Im2GPS3k / YFCC4k style benchmark metadata, and their image files.

Formats seen in the wild:

- ``im2gps3k_places365.csv`` (TIBHannover/GeoEstimation): header
  ``IMG_ID,AUTHOR,LON,LAT,S3_Label,...``, but the values are latitude first (the column
  named LON holds latitudes). Other copies say ``IMG_ID,AUTHOR,LAT,LON,...`` and are right.
- ``yfcc4k_places365.csv``: same layout; or a plain CSV with ``photo_id/IMG_ID/id``,
  ``latitude/lat``, ``longitude/lon/lng`` columns.

Whatever the header says, ``latlon_order="auto"`` decides which column is the latitude
(geodata.eval_sets.latlon_order). Bad rows are quarantined with their file line, never
dropped silently. Line numbers are physical lines of the file (header = line 1).

Benchmark code for these sets counts a hit when dist <= r (inclusive): score them with
``hierloc.infer.metrics.osv5m_metrics(..., inclusive=True)`` (see INCLUSIVE_BY_FORMAT).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geodata.eval_sets.latlon_order import decide_order, to_float
from geodata.labels.geonames import GeoNamesLabeler

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("im2gps3k", "yfcc4k", "generic")
LATLON_ORDERS: tuple[str, ...] = ("auto", "as-labelled", "swapped")

#: Whether the benchmark's own evaluation counts d <= r (True) or d < r.
INCLUSIVE_BY_FORMAT: dict[str, bool] = {"im2gps3k": True, "yfcc4k": True, "generic": True}

#: Candidate column names, compared case-insensitively, in order of preference.
ID_NAMES: tuple[str, ...] = ("img_id", "photo_id", "image_id", "id")
IMAGE_NAMES: tuple[str, ...] = ("image", "img", "filename", "file_name", "image_path", "file", "path")
LAT_NAMES: tuple[str, ...] = ("lat", "latitude", "lat_deg", "gps_lat")
LON_NAMES: tuple[str, ...] = ("lon", "lng", "long", "longitude", "lon_deg", "gps_lon")

#: Columns of BenchmarkTable.rows and .quarantine.
ROW_COLUMNS: tuple[str, ...] = ("id", "image", "latitude", "longitude")
QUARANTINE_COLUMNS: tuple[str, ...] = ("file", "line", "field", "reason", "value")
_SHOW_BAD = 5


@dataclass(frozen=True)
class BenchmarkTable:
    """A benchmark's ground truth as read.

    rows: DataFrame (N, 4): id, image (str), latitude, longitude (float64 degrees), in file order.
    quarantine: DataFrame (Q, 5): file, line (int, 1-based, header = 1), field, reason, value.
    fmt: "im2gps3k", "yfcc4k" or "generic". swapped: coordinates were taken in the
    order opposite to the header's labels. swap_evidence: one line saying why.
    """

    rows: pd.DataFrame
    quarantine: pd.DataFrame
    fmt: str
    swapped: bool
    swap_evidence: str


def _pick_column(
    header: list[str], wanted: str | None, names: tuple[str, ...], what: str, path: Path
) -> str | None:
    """The header column for ``what``: ``wanted`` if given (must exist), else the first of ``names``."""
    lower: dict[str, list[str]] = {}
    for col in header:
        lower.setdefault(col.strip().lower(), []).append(col)
    if wanted is not None:
        if wanted in header:
            return wanted
        hits = lower.get(wanted.strip().lower(), [])
        if len(hits) == 1:
            return hits[0]
        raise ValueError(
            f"{path}, line 1: {what} column {wanted!r} not in header {header}"
            + ("" if not hits else f" (several case-insensitive matches: {hits})")
        )
    for name in names:
        hits = lower.get(name, [])
        if len(hits) > 1:
            raise ValueError(
                f"{path}, line 1: columns {hits} all look like the {what} column; "
                f"pass {what}_col= to choose"
            )
        if hits:
            return hits[0]
    return None


def detect_format(path: Path) -> str:
    """The benchmark named in the file name ("im2gps3k", "yfcc4k"), else "generic"."""
    name = path.name.lower()
    if "im2gps" in name:
        return "im2gps3k"
    if "yfcc" in name:
        return "yfcc4k"
    return "generic"

def _read_csv_lines(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (start line, fields) of each record; blank lines skipped."""
    records: list[tuple[int, list[str]]] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a CSV header with id and coordinates")
        start = reader.line_num + 1
        for fields in reader:
            if fields:
                records.append((start, fields))
            start = reader.line_num + 1
    return [h.strip() for h in header], records


def _columns(
    path: Path, header: list[str], id_col: str | None, image_col: str | None, lat_col: str | None, lon_col: str | None
) -> tuple[str, str, str, str]:
    """The header's (id, image, labelled-latitude, labelled-longitude) columns; the image column
    is the id where there is none (and the other way round). ValueError naming the missing ones."""
    cid = _pick_column(header, id_col, ID_NAMES, "id", path)
    cimg = _pick_column(header, image_col, IMAGE_NAMES, "image", path)
    cid = cid or cimg
    cimg = cimg or cid
    clat = _pick_column(header, lat_col, LAT_NAMES, "lat", path)
    clon = _pick_column(header, lon_col, LON_NAMES, "lon", path)
    missing = [w for w, c in (("id", cid), ("latitude", clat), ("longitude", clon)) if c is None]
    if missing:
        raise ValueError(
            f"{path}, line 1: no {' / '.join(missing)} column in header {header}; "
            "pass id_col=, lat_col=, lon_col= to name them"
        )
    assert cid is not None and cimg is not None and clat is not None and clon is not None
    return cid, cimg, clat, clon


def quarantine_entry(path: Path, line: int, field: str, reason: str, value: str) -> dict[str, object]:
    """One row of a quarantine table (QUARANTINE_COLUMNS)."""
    return {"file": str(path), "line": line, "field": field, "reason": reason, "value": value}


def _coordinate(text: str, what: str, limit: float, range_note: str = "") -> tuple[float | None, str]:
    """(value, "") for a finite number within [-limit, limit], else (None, why it is bad)."""
    value = to_float(text)
    if value is None:
        return None, f"{what} is not a number"
    if not math.isfinite(value):
        return None, f"{what} is not finite"
    if abs(value) > limit:
        return None, f"{what} outside [-{limit:g}, {limit:g}]" + range_note
    return value, ""


def _good_rows(
    path: Path,
    header: list[str],
    complete: list[tuple[int, list[str]]],
    columns: tuple[str, str, str, str],
    swapped: bool,
    bad: list[dict[str, object]],
) -> list[tuple[str, str, float, float]]:
    """(id, image, latitude, longitude) of each complete record with an id and good coordinates,
    the first occurrence of an id kept; the others go to ``bad`` (one entry per bad field)."""
    cid, cimg, clat, clon = columns
    i_id, i_img, i_lat, i_lon = (header.index(c) for c in columns)
    # the file columns actually read as latitude / longitude
    (src_lat, j_lat), (src_lon, j_lon) = (
        ((clon, i_lon), (clat, i_lat)) if swapped else ((clat, i_lat), (clon, i_lon))
    )
    note = f" (read as latitude: {'swapped' if swapped else 'as-labelled'} order)"

    kept: list[tuple[str, str, float, float]] = []
    first_line: dict[str, int] = {}
    for line, fields in complete:
        ok = True
        row_id = fields[i_id].strip()
        if not row_id:
            bad.append(quarantine_entry(path, line, cid, "empty id", fields[i_id]))
            ok = False
        coords: list[float] = []
        for what, col, j, limit, range_note in (("latitude", src_lat, j_lat, 90.0, note),
                                                ("longitude", src_lon, j_lon, 180.0, "")):
            value, reason = _coordinate(fields[j], what, limit, range_note)
            if value is None:
                bad.append(quarantine_entry(path, line, col, reason, fields[j]))
                ok = False
            else:
                coords.append(value)
        if not ok:
            continue
        if row_id in first_line:
            bad.append(quarantine_entry(path, line, cid, f"duplicate id, kept line {first_line[row_id]}", row_id))
            continue
        first_line[row_id] = line
        image = fields[i_img].strip() or row_id
        kept.append((row_id, image, coords[0], coords[1]))
    return kept


def quarantine_table(path: Path, bad: list[dict[str, object]], n_rows: int, max_bad_fraction: float,
                     advice: str) -> pd.DataFrame:
    """The quarantine (QUARANTINE_COLUMNS, by line) of a file of ``n_rows`` data rows, its bad rows
    logged. Raises ValueError naming the file, the first bad rows and ``advice`` when more than
    ``max_bad_fraction`` of the rows are bad."""
    quarantined = pd.DataFrame(bad, columns=list(QUARANTINE_COLUMNS))
    quarantined = quarantined.sort_values("line", kind="stable").reset_index(drop=True)
    n_bad_lines = int(quarantined["line"].nunique())
    if n_bad_lines > max_bad_fraction * n_rows:
        first = "; ".join(
            f"line {r.line} {r.field}={r.value!r}: {r.reason}"
            for r in quarantined.head(_SHOW_BAD).itertuples()
        )
        raise ValueError(
            f"{path}: {n_bad_lines} of {n_rows} data rows are bad "
            f"(> max_bad_fraction={max_bad_fraction:g}); first: {first}. {advice}"
        )
    if n_bad_lines:
        first_bad = int(quarantined["line"][0])
        log.warning("%s: %d bad row(s) quarantined, first on line %d", path, n_bad_lines, first_bad)
    return quarantined


def read_geo_benchmark(
    path: str | Path,
    *,
    fmt: str = "auto",
    id_col: str | None = None,
    lat_col: str | None = None,
    lon_col: str | None = None,
    image_col: str | None = None,
    latlon_order: str = "auto",
    max_bad_fraction: float = 0.05,
    labeler: GeoNamesLabeler | None = None,
    seed: int = 0,
) -> BenchmarkTable:
    """Read a geolocation benchmark's ground-truth CSV (Im2GPS3k, YFCC4k or generic).

    Columns are found case-insensitively (ID_NAMES, IMAGE_NAMES, LAT_NAMES, LON_NAMES);
    *_col arguments override. ``lat_col``/``lon_col`` name the columns *labelled* latitude /
    longitude; ``latlon_order`` says whether to read them "as-labelled", "swapped", or
    decide ("auto", see decide_order). ``image`` is the image column, else the id.
    Quarantined (one entry per bad field, first occurrence of an id kept): wrong field
    count, empty id, unparsable / non-finite / out-of-range coordinate, duplicate id.
    Raises ValueError naming the file and the first bad rows when more than
    ``max_bad_fraction`` of the data rows are bad, or when no data row exists.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected 'auto' or one of {list(FORMATS)}")
    if latlon_order not in LATLON_ORDERS:
        raise ValueError(f"latlon_order={latlon_order!r}: expected one of {list(LATLON_ORDERS)}")
    header, records = _read_csv_lines(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    columns = _columns(path, header, id_col, image_col, lat_col, lon_col)
    if not records:
        raise ValueError(f"{path}: no data rows after the header")

    bad: list[dict[str, object]] = []
    complete: list[tuple[int, list[str]]] = []
    for line, fields in records:
        if len(fields) != len(header):
            reason = f"{len(fields)} fields, header has {len(header)}"
            bad.append(quarantine_entry(path, line, "(row)", reason, ",".join(fields)[:200]))
        else:
            complete.append((line, fields))

    if latlon_order == "auto":
        i_lat, i_lon = header.index(columns[2]), header.index(columns[3])
        swapped, evidence = decide_order(
            [f[i_lat] for _, f in complete], [f[i_lon] for _, f in complete], labeler=labeler, seed=seed
        )
    else:
        swapped = latlon_order == "swapped"
        evidence = f"{latlon_order}: set by the caller (latlon_order={latlon_order!r})"
    kept = _good_rows(path, header, complete, columns, swapped, bad)
    quarantined = quarantine_table(
        path, bad, len(records), max_bad_fraction,
        f"Coordinate order: {evidence}. Fix the file, check the column names / latlon_order, "
        "or raise max_bad_fraction",
    )
    rows = pd.DataFrame(kept, columns=list(ROW_COLUMNS))
    rows = rows.astype({"id": str, "image": str, "latitude": np.float64, "longitude": np.float64})
    return BenchmarkTable(rows=rows, quarantine=quarantined, fmt=fmt, swapped=swapped, swap_evidence=evidence)
