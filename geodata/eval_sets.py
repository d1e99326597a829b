"""Readers for Im2GPS3k / YFCC4k style benchmark metadata, and their image files.

Formats seen in the wild:

- ``im2gps3k_places365.csv`` (TIBHannover/GeoEstimation): header
  ``IMG_ID,AUTHOR,LON,LAT,S3_Label,...``, but the values are latitude first (the column
  named LON holds latitudes). Other copies say ``IMG_ID,AUTHOR,LAT,LON,...`` and are right.
- ``yfcc4k_places365.csv``: same layout; or a plain CSV with ``photo_id/IMG_ID/id``,
  ``latitude/lat``, ``longitude/lon/lng`` columns.

Whatever the header says, ``latlon_order="auto"`` decides which column is the latitude:
by range (a |value| > 90 can only be a longitude) and by plausibility (photos are taken
near populated places: the order whose points lie clearly closer to their nearest
GeoNames cities1000 place wins). Bad rows are quarantined with their file line, never
dropped silently. Line numbers are physical lines of the file (header = line 1).

Benchmark code for these sets counts a hit when dist <= r (inclusive): score them with
``hierloc.infer.metrics.osv5m_metrics(..., inclusive=True)`` (see INCLUSIVE_BY_FORMAT).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geodata.labels.geonames import GeoNamesLabeler, default_labeler

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

#: File name endings accepted as benchmark images (compared lower-case).
BENCHMARK_IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")

#: One order must have a median nearest-place distance this many times smaller to win.
PLAUSIBILITY_FACTOR = 2.0
#: Rows sampled for the plausibility check.
PLAUSIBILITY_SAMPLE_ROWS = 5_000
#: Rough km per degree, only to make swap_evidence readable.
_KM_PER_DEG = 111.2
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


def _to_float(text: str) -> float | None:
    """Python float() of a cell, None when it does not parse."""
    try:
        return float(text)
    except ValueError:
        return None


def _median_nearest_deg(labeler: GeoNamesLabeler, lat_deg: np.ndarray, lon_deg: np.ndarray) -> float:
    """Median distance (degrees, the labeler's own metric) to the nearest GeoNames place."""
    dist_deg, _ = labeler.tree.query(np.column_stack([lat_deg, lon_deg]), k=1)
    return float(np.median(dist_deg))


def _fmt_deg(d: float) -> str:
    return f"{d:.3g} deg (~{d * _KM_PER_DEG:.0f} km)"


def _plausibility(
    a: np.ndarray, b: np.ndarray, labeler: GeoNamesLabeler, seed: int
) -> tuple[str | None, str]:
    """Which order is plausible: "as-labelled", "swapped" or None (unclear), with evidence.

    a: values of the labelled-latitude column, b: of the labelled-longitude column,
    (N,) finite with |a|, |b| <= 90 so both readings are valid points.
    """
    if a.size == 0:
        return None, "no row valid in both orders to compare"
    if a.size > PLAUSIBILITY_SAMPLE_ROWS:
        pick = np.random.default_rng(seed).choice(a.size, PLAUSIBILITY_SAMPLE_ROWS, replace=False)
        a, b = a[pick], b[pick]
    as_deg = _median_nearest_deg(labeler, a, b)
    sw_deg = _median_nearest_deg(labeler, b, a)
    text = (
        f"median distance to the nearest GeoNames place over {a.size} rows: "
        f"as labelled {_fmt_deg(as_deg)}, swapped {_fmt_deg(sw_deg)}"
    )
    if sw_deg * PLAUSIBILITY_FACTOR <= as_deg and as_deg > 0:
        return "swapped", text
    if as_deg * PLAUSIBILITY_FACTOR <= sw_deg and sw_deg > 0:
        return "as-labelled", text
    return None, text


def decide_order(
    lat_text: list[str],
    lon_text: list[str],
    *,
    labeler: GeoNamesLabeler | None = None,
    seed: int = 0,
) -> tuple[bool, str]:
    """(swapped, evidence) for two columns of coordinate strings labelled latitude, longitude.

    1. Range: a |labelled latitude| > 90 with every labelled longitude in [-90, 90] means
       swapped; the mirror case means as labelled.
    2. Plausibility (always computed, on <= PLAUSIBILITY_SAMPLE_ROWS seeded rows): the order
       whose median nearest-place distance is PLAUSIBILITY_FACTOR times smaller wins. It
       overrides the range rule when it clearly contradicts it (a single corrupt value
       must not swap a whole file; the corrupt rows then go to the quarantine).
    Neither conclusive: as labelled, said so in the evidence.
    """
    a = np.array([_to_float(t) for t in lat_text], dtype=np.float64)  # None -> nan
    b = np.array([_to_float(t) for t in lon_text], dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    a_wide, b_wide = np.abs(a) > 90, np.abs(b) > 90

    by_range: str | None = None
    range_text = ""
    if a_wide.any() and not b_wide.any():
        by_range = "swapped"
        range_text = (
            f"{int(a_wide.sum())} labelled-latitude value(s) have |v| > 90 "
            f"(e.g. {a[a_wide][0]:g}) while every labelled longitude is within [-90, 90]"
        )
    elif b_wide.any() and not a_wide.any():
        by_range = "as-labelled"
        range_text = (
            f"{int(b_wide.sum())} labelled-longitude value(s) have |v| > 90 "
            f"(e.g. {b[b_wide][0]:g}) while every labelled latitude is within [-90, 90]"
        )

    both = ~a_wide & ~b_wide
    by_plaus, plaus_text = _plausibility(a[both], b[both], labeler or default_labeler(), seed)

    if by_range is not None and by_plaus not in (None, by_range):
        return by_plaus == "swapped", (
            f"{by_plaus} by plausibility ({plaus_text}), overriding the range rule "
            f"({range_text}): those values are treated as bad rows"
        )
    if by_range is not None:
        return by_range == "swapped", f"{by_range}: {range_text}; {plaus_text}"
    if by_plaus is not None:
        return by_plaus == "swapped", f"{by_plaus} by plausibility: {plaus_text}"
    return False, (
        f"as-labelled: neither order is clearly more plausible ({plaus_text}; "
        f"need a factor {PLAUSIBILITY_FACTOR:g}); pass latlon_order= to be sure"
    )


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
    if not records:
        raise ValueError(f"{path}: no data rows after the header")
    i_id, i_img, i_lat, i_lon = (header.index(c) for c in (cid, cimg, clat, clon))

    bad: list[dict[str, object]] = []

    def quarantine(line: int, field: str, reason: str, value: str) -> None:
        bad.append({"file": str(path), "line": line, "field": field, "reason": reason, "value": value})

    complete: list[tuple[int, list[str]]] = []
    for line, fields in records:
        if len(fields) != len(header):
            quarantine(
                line, "(row)", f"{len(fields)} fields, header has {len(header)}", ",".join(fields)[:200]
            )
        else:
            complete.append((line, fields))

    if latlon_order == "auto":
        swapped, evidence = decide_order(
            [f[i_lat] for _, f in complete], [f[i_lon] for _, f in complete], labeler=labeler, seed=seed
        )
    else:
        swapped = latlon_order == "swapped"
        evidence = f"{latlon_order}: set by the caller (latlon_order={latlon_order!r})"
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
            quarantine(line, cid, "empty id", fields[i_id])
            ok = False
        coords: list[float] = []
        for what, col, j, limit in (("latitude", src_lat, j_lat, 90.0), ("longitude", src_lon, j_lon, 180.0)):
            value = _to_float(fields[j])
            if value is None:
                quarantine(line, col, f"{what} is not a number", fields[j])
                ok = False
            elif not math.isfinite(value):
                quarantine(line, col, f"{what} is not finite", fields[j])
                ok = False
            elif abs(value) > limit:
                reason = f"{what} outside [-{limit:g}, {limit:g}]"
                quarantine(line, col, reason + (note if what == "latitude" else ""), fields[j])
                ok = False
            else:
                coords.append(value)
        if not ok:
            continue
        if row_id in first_line:
            quarantine(line, cid, f"duplicate id, kept line {first_line[row_id]}", row_id)
            continue
        first_line[row_id] = line
        image = fields[i_img].strip() or row_id
        kept.append((row_id, image, coords[0], coords[1]))

    quarantined = pd.DataFrame(bad, columns=list(QUARANTINE_COLUMNS))
    quarantined = quarantined.sort_values("line", kind="stable").reset_index(drop=True)
    n_bad_lines = int(quarantined["line"].nunique())
    if n_bad_lines > max_bad_fraction * len(records):
        first = "; ".join(
            f"line {r.line} {r.field}={r.value!r}: {r.reason}"
            for r in quarantined.head(_SHOW_BAD).itertuples()
        )
        raise ValueError(
            f"{path}: {n_bad_lines} of {len(records)} data rows are bad "
            f"(> max_bad_fraction={max_bad_fraction:g}); first: {first}. "
            f"Coordinate order: {evidence}. Fix the file, check the column names / "
            "latlon_order, or raise max_bad_fraction"
        )
    rows = pd.DataFrame(kept, columns=list(ROW_COLUMNS))
    rows = rows.astype({"id": str, "image": str, "latitude": np.float64, "longitude": np.float64})
    if n_bad_lines:
        first_bad = int(quarantined["line"][0])
        log.warning("%s: %d bad row(s) quarantined, first on line %d", path, n_bad_lines, first_bad)
    return BenchmarkTable(rows=rows, quarantine=quarantined, fmt=fmt, swapped=swapped, swap_evidence=evidence)


def _is_benchmark_image(name: str) -> bool:
    """An image file name (.jpg/.jpeg/.png, any case), not a macOS resource fork."""
    return not name.startswith("._") and name.lower().endswith(BENCHMARK_IMAGE_SUFFIXES)


def find_benchmark_images(
    images_dir: str | Path, names: list[str] | pd.Series
) -> tuple[dict[str, Path], list[str]]:
    """Map image names (e.g. BenchmarkTable.rows["image"]) to files under ``images_dir``.

    Walks ``images_dir`` at any depth once. A name matches, in this order: the relative
    path itself ("sub/x.jpg"); a file whose relative path ends with it; a file of the same
    base name; for names without an image suffix, a file whose stem is the name's base
    name (x -> x.jpg / x.jpeg / x.png). Names are case-sensitive (suffixes are not).
    Several candidates: regular files first, then the shortest, then first, relative path
    (logged). Image-named fifos, devices and sockets are listed but never opened here: a
    name that only they match maps to them, and reading it (geodata.ingest.image_decode.open_photo)
    refuses it with a reason naming the file; the count is logged.
    Returns ({name: path}, [missing names, in input order]).
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: images folder not found")
    by_rel: dict[str, Path] = {}
    by_base: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    irregular: set[str] = set()  # not regular files: matched last, refused when read
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        for fname in sorted(filenames):
            if not _is_benchmark_image(fname):
                continue
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            if not full.is_file():
                irregular.add(rel)
            by_rel[rel] = full
            by_base.setdefault(fname, []).append(rel)
            by_stem.setdefault(fname.rsplit(".", 1)[0], []).append(rel)

    found: dict[str, Path] = {}
    missing: list[str] = []
    n_ambiguous = 0
    for name in dict.fromkeys(str(n) for n in names):
        text = name.replace("\\", "/")
        while text.startswith("./"):
            text = text[2:]
        base = text.rsplit("/", 1)[-1]
        if text in by_rel:
            found[name] = by_rel[text]
            continue
        if _is_benchmark_image(base):
            cands = [r for r in by_base.get(base, []) if r.endswith("/" + text)] or by_base.get(base, [])
        else:
            cands = by_stem.get(base, [])
        if not cands:
            missing.append(name)
            continue
        if len(cands) > 1:
            n_ambiguous += 1
        found[name] = by_rel[min(cands, key=lambda r: (r in irregular, len(r), r))]
    if irregular:
        log.warning("%s: %d image name(s) are not regular files (fifo, device, ...), e.g. %s; they are "
                    "never read", root, len(irregular), min(irregular))
    if n_ambiguous:
        log.warning("%s: %d image name(s) match several files; took the shortest path", root, n_ambiguous)
    return found, missing
