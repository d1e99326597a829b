"""Evaluate a model bundle on a geolocation benchmark: Im2GPS3k, YFCC4k, a generic CSV, or OSV-5M.

For ``hierloc evaluate``. One function, ``evaluate_benchmark``, wires geodata (ground-truth
readers, image finding, GeoNames labels) to hierloc (the Predictor's backbone and beam search)
and to flows.report.scoring (the official metrics):

1. read the ground truth: ``geodata.eval_sets.read_geo_benchmark`` for im2gps3k / yfcc4k /
   generic files (latitude/longitude order decided and explained, bad rows quarantined with
   their line); ``read_osv5m_truth`` for an OSV-5M ``test.csv``;
2. find every row's image under the images folder; a row without its image is counted and
   listed (``skipped.csv``), never dropped silently;
3. decode photos in batches (a thread pool, one batch ahead), backbone features, beam search;
   a photo that does not decode is counted and listed like a missing one;
4. metrics with ``flows.report.scoring.score_points``: truth keys are the file's OSV-5M labels
   (osv5m), or GeoNames labels of the true coordinates (``geodata.labels.geonames.label_frame``,
   the way OSV-5M labelled its release) for benchmarks that have none. Distance thresholds
   count ``d <= r`` for im2gps3k / yfcc4k / generic (their code) and ``d < r`` for osv5m
   (its code), unless ``inclusive`` says otherwise. The entity picked at each level by the
   beam search is scored too (``pick_acc_<level>``), against the truth's composite keys.

With ``out_dir``: predictions.parquet, metrics.json, skipped.csv, error_map.png, error_cdf.png.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from flows.report.charts import error_cdf
from flows.report.maps import error_map
from flows.report.scoring import score_points
from geodata.eval_sets import (
    INCLUSIVE_BY_FORMAT,
    LATLON_ORDERS,
    detect_format,
    find_benchmark_images,
    read_geo_benchmark,
)
from geodata.labels.geonames import label_frame
from geodata.labels.hierarchy import level_keys
from geodata.ingest.images import DEFAULT_MAX_IMAGE_PIXELS, open_photo
from geodata.atomic import write_parquet_atomic, write_text_atomic
from geodata.osv5m import LABEL_COLUMNS, LEVELS, UNIQUE_COLUMNS, unique_keys
from hierloc.geometry.geo import geoscore
from hierloc.infer.predictor import Predictor

log = logging.getLogger(__name__)

#: Formats ``evaluate_benchmark`` reads ("auto" decides from the header and the file name).
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

#: How many examples of skipped rows the result (and metrics.json) lists; skipped.csv has all.
SHOW_SKIPPED = 20
SKIPPED_COLUMNS: tuple[str, ...] = ("kind", "id", "image", "line", "field", "reason", "value")


# --- reading the ground truth ------------------------------------------------------------
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
    benchmark named in the file name (geodata.eval_sets.detect_format)."""
    with open(meta_csv, encoding="utf-8-sig", newline="") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    return "osv5m" if _osv5m_columns(header) else detect_format(Path(meta_csv))


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
    line = np.arange(len(df)) + 2
    bad: list[dict] = []

    def quarantine(mask: np.ndarray, field: str, reason: str, values: pd.Series) -> None:
        for i in np.flatnonzero(mask):
            bad.append({"file": str(path), "line": int(line[i]), "field": field, "reason": reason, "value": str(values.iloc[i])[:200]})

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
            bad.append({"file": str(path), "line": int(line[i]), "field": cols["id"],
                        "reason": f"duplicate id, kept line {first[ids.iloc[i]]}", "value": ids.iloc[i]})
    ok &= ~dup
    quarantined = pd.DataFrame(bad, columns=["file", "line", "field", "reason", "value"])
    quarantined = quarantined.sort_values("line", kind="stable").reset_index(drop=True)
    n_bad = int(quarantined["line"].nunique())
    if n_bad > max_bad_fraction * len(df):
        first = "; ".join(f"line {r.line} {r.field}={r.value!r}: {r.reason}" for r in quarantined.head(5).itertuples())
        raise ValueError(f"{path}: {n_bad} of {len(df)} data rows are bad (> max_bad_fraction={max_bad_fraction:g}); "
                         f"first: {first}. Fix the file or raise max_bad_fraction")
    if n_bad:
        log.warning("%s: %d bad row(s) quarantined, first on line %d", path, n_bad, int(quarantined["line"][0]))
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


# --- decoding photos in batches -----------------------------------------------------------
def _decode(path: Path, max_image_pixels: int) -> tuple[object | None, str]:
    try:
        return open_photo(path, max_image_pixels), ""
    except Exception as exc:  # reported per photo; the others go on
        return None, photo_error(path, exc)


def photo_error(path: Path, exc: BaseException) -> str:
    """One line saying why ``path`` could not be read, without repeating the path."""
    text = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        text = f"{type(exc).__name__}: {exc.strerror or text}"
    return text.replace("\n", " ")


def decoded_batches(paths: Sequence[Path], batch_size: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                    workers: int | None = None) -> Iterator[list[tuple[int, object | None, str]]]:
    """Decode photos in batches of ``batch_size``: yields [(index in paths, RGB image or None, error)].

    A thread pool decodes the next batch while the caller works on the current one, so at
    most two batches of images are in memory. Errors (missing, not an image, over
    ``max_image_pixels``) are returned per photo, never raised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    workers = workers or min(4, os.cpu_count() or 1)
    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(s: int):
            return [(i, pool.submit(_decode, paths[i], max_image_pixels)) for i in range(s, min(s + batch_size, len(paths)))]

        pending = submit(0) if len(paths) else []
        for s in starts:
            current = pending
            pending = submit(s + batch_size) if s + batch_size < len(paths) else []
            yield [(i, *fut.result()) for i, fut in current]


# --- the evaluation ------------------------------------------------------------------------
def _skipped_frame(truth: Truth, missing: Iterable[tuple[str, str]], unreadable: Iterable[tuple[str, str, str]],
                   images_dir: Path) -> pd.DataFrame:
    q = truth.quarantine
    parts = [pd.DataFrame({"kind": "quarantined", "id": "", "image": "", "line": q["line"].astype("Int64"),
                           "field": q["field"], "reason": q["reason"], "value": q["value"]})]
    parts.append(pd.DataFrame([{"kind": "missing_image", "id": i, "image": im, "line": pd.NA, "field": "",
                                "reason": f"no such image under {images_dir}", "value": ""} for i, im in missing]))
    parts.append(pd.DataFrame([{"kind": "unreadable_image", "id": i, "image": im, "line": pd.NA, "field": "",
                                "reason": err, "value": ""} for i, im, err in unreadable]))
    parts = [p for p in parts if len(p)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SKIPPED_COLUMNS))
    return out.reindex(columns=list(SKIPPED_COLUMNS))


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with missing values as None (JSON null)."""
    return [{k: (None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return _json_safe(float(value))
    return value


def evaluate_benchmark(
    bundle_or_predictor: Path | str | Predictor,
    meta_csv: Path | str,
    images_dir: Path | str,
    *,
    fmt: str = "auto",
    latlon_order: str = "auto",
    variant: str = "official",
    inclusive: bool | None = None,
    beam_k: int = 10,
    out_dir: Path | str | None = None,
    batch_size: int = 32,
    max_bad_fraction: float = 0.05,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Predict every benchmark photo found and score the predictions (see module doc).

    bundle_or_predictor: a bundle folder (hierloc.infer.predictor) or a loaded Predictor with its
    backbone. fmt: one of EVAL_FORMATS. inclusive: None = the benchmark's own rule
    (d <= r for im2gps3k / yfcc4k / generic, d < r for osv5m). progress(done, total,
    seconds) is called after each batch.

    Returns a JSON-ready dict: format, variant, inclusive, swapped, swap_evidence, counts
    (n_rows, n_evaluated, n_missing_images, n_unreadable_images, n_quarantined), examples
    of skipped rows, metrics (flows.report.scoring names + pick_acc_<level>), timings, and the
    written files. Raises ValueError when no row could be evaluated.
    """
    t_start = time.perf_counter()
    images_dir, meta_csv = Path(images_dir), Path(meta_csv)
    if beam_k < 1:
        raise ValueError(f"beam_k={beam_k}: must be >= 1")
    truth = read_truth(meta_csv, fmt, latlon_order, max_bad_fraction)
    fmt = truth.fmt
    inclusive = INCLUSIVE_BY_FORMAT.get(fmt, False) if inclusive is None else bool(inclusive)
    log.info("%s: coordinate order %s", meta_csv, truth.swap_evidence)
    n_quarantined = int(truth.quarantine["line"].nunique())  # the readers log them

    rows = truth.rows
    found, missing_names = find_benchmark_images(images_dir, rows["image"].tolist())
    has_image = rows["image"].isin(list(found)).to_numpy()
    missing = list(zip(rows.loc[~has_image, "id"], rows.loc[~has_image, "image"]))
    if missing:
        log.warning("%d of %d benchmark image(s) not found under %s, e.g. %s", len(missing), len(rows), images_dir,
                    ", ".join(im for _, im in missing[:5]))
    rows = rows[has_image].reset_index(drop=True)
    paths = [found[name] for name in rows["image"]]

    predictor = bundle_or_predictor if isinstance(bundle_or_predictor, Predictor) else Predictor.load(
        Path(bundle_or_predictor), device=device)
    n = len(rows)
    pred_lat, pred_lon = np.full(n, np.nan), np.full(n, np.nan)
    picks = {lvl: np.full(n, "", dtype=object) for lvl in LEVELS}
    pick_names = {lvl: np.full(n, "", dtype=object) for lvl in LEVELS}
    pick_probs = {lvl: np.full(n, np.nan) for lvl in LEVELS}
    answered = np.zeros(n, dtype=bool)
    unreadable: list[tuple[str, str, str]] = []
    t_search = 0.0
    done = 0
    for batch in decoded_batches(paths, batch_size, max_image_pixels):
        good = [(i, im) for i, im, err in batch if im is not None]
        unreadable += [(rows.at[i, "id"], rows.at[i, "image"], err) for i, im, err in batch if im is None]
        if good:
            feats = predictor.image_features([im for _, im in good], batch_size=batch_size)
            t0 = time.perf_counter()
            preds = predictor.predict_features(feats, top_k=1, beam_k=beam_k)
            t_search += time.perf_counter() - t0
            for (i, _), p in zip(good, preds):
                pred_lat[i], pred_lon[i] = p.latitude, p.longitude
                for lvl in LEVELS:
                    picks[lvl][i] = p.levels[lvl]["key"]
                    pick_names[lvl][i] = p.levels[lvl]["name"]
                    pick_probs[lvl][i] = p.levels[lvl]["prob"]
                answered[i] = True
        done += len(batch)
        if progress is not None:
            progress(done, n, time.perf_counter() - t_start)
    if unreadable:
        log.warning("%d benchmark image(s) could not be decoded, e.g. %s: %s", len(unreadable), unreadable[0][1],
                    unreadable[0][2])

    ok = answered  # rows whose photo was found and decoded
    n_eval = int(ok.sum())
    if n_eval == 0:
        raise ValueError(
            f"no benchmark row could be evaluated: {len(truth.rows)} row(s) read from {meta_csv}, "
            f"{len(missing)} image(s) missing under {images_dir}, {len(unreadable)} unreadable, "
            f"{n_quarantined} row(s) quarantined; check --images (images are matched by the file's "
            f"image/id column{', as <id>.jpg' if fmt == 'osv5m' else ''})")
    ev = rows[ok].reset_index(drop=True)
    p_lat, p_lon = pred_lat[ok], pred_lon[ok]
    metrics, dist_km, hits = score_points(p_lat, p_lon, ev["latitude"].to_numpy(np.float64),
                                          ev["longitude"].to_numpy(np.float64), ev[list(UNIQUE_COLUMNS)],
                                          variant=variant, inclusive=inclusive)
    truth_keys = level_keys(ev[list(LABEL_COLUMNS)])
    pick_hits = {lvl: picks[lvl][ok] == truth_keys[lvl].to_numpy(dtype=object) for lvl in LEVELS}
    for lvl in LEVELS:
        metrics[f"pick_acc_{lvl}"] = float(pick_hits[lvl].mean())

    skipped = _skipped_frame(truth, missing, unreadable, images_dir)
    result = {
        "format": fmt, "meta_csv": str(meta_csv), "images_dir": str(images_dir),
        "variant": variant, "inclusive": inclusive, "beam_k": beam_k,
        "swapped": truth.swapped, "swap_evidence": truth.swap_evidence,
        "n_rows": truth.n_data_rows, "n_evaluated": n_eval, "n_missing_images": len(missing),
        "n_unreadable_images": len(unreadable), "n_quarantined": n_quarantined,
        "skipped_examples": _records(skipped.head(SHOW_SKIPPED)),
        "metrics": metrics,
        "search_ms_per_image": 1000.0 * t_search / n_eval,
        "seconds": time.perf_counter() - t_start,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame({
            "id": ev["id"], "image": ev["image"],
            "true_latitude": ev["latitude"], "true_longitude": ev["longitude"],
            "latitude": p_lat, "longitude": p_lon, "dist_km": dist_km, "geoscore": geoscore(dist_km),
            **{f"pick_{lvl}": picks[lvl][ok] for lvl in LEVELS},
            **{f"pick_{lvl}_name": pick_names[lvl][ok] for lvl in LEVELS},
            **{f"pick_{lvl}_prob": pick_probs[lvl][ok] for lvl in LEVELS},
            **{f"pick_hit_{lvl}": pick_hits[lvl].astype(bool) for lvl in LEVELS},
            **{f"hit_{lvl}": np.asarray(v, dtype=bool) for lvl, v in hits.items()},
        })
        files = {"predictions": out_dir / "predictions.parquet", "metrics": out_dir / "metrics.json",
                 "skipped": out_dir / "skipped.csv", "error_map": out_dir / "error_map.png",
                 "error_cdf": out_dir / "error_cdf.png"}
        write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), files["predictions"])
        write_text_atomic(skipped.to_csv(index=False, lineterminator="\n"), files["skipped"])
        error_map(ev["latitude"], ev["longitude"], p_lat, p_lon, files["error_map"],
                  title=f"{meta_csv.name}: {n_eval} photos, median error {np.median(dist_km):.0f} km")
        error_cdf(dist_km, files["error_cdf"])
        result["files"] = {k: str(v) for k, v in files.items()}
        write_text_atomic(json.dumps(_json_safe(result), indent=2), files["metrics"])
    return _json_safe(result)
