"""Evaluate a model bundle on a geolocation benchmark: Im2GPS3k, YFCC4k, a generic CSV, or OSV-5M.

For ``hierloc evaluate``. One function, ``evaluate_benchmark``, wires geodata (ground-truth
readers, image finding, GeoNames labels) to hierloc (the Predictor's backbone and beam search)
and to flows.report.scoring (the official metrics):

1. read the ground truth (``geodata.eval_sets.truth.read_truth``): im2gps3k / yfcc4k / generic
   files (latitude/longitude order decided and explained, bad rows quarantined with their
   line) or an OSV-5M ``test.csv``;
2. find every row's image under the images folder (``geodata.eval_sets.photos``); a row
   without its image is counted and listed (``skipped.csv``), never dropped silently;
3. decode photos in batches (a thread pool, one batch ahead), backbone features, beam search;
   a photo that does not decode is counted and listed like a missing one;
4. metrics with ``flows.report.scoring.score_points``: truth keys are the file's OSV-5M labels
   (osv5m), or GeoNames labels of the true coordinates (``geodata.labels.geonames_csv.label_frame``,
   the way OSV-5M labelled its release) for benchmarks that have none. Distance thresholds
   count ``d <= r`` for im2gps3k / yfcc4k / generic (their code) and ``d < r`` for osv5m
   (its code), unless ``inclusive`` says otherwise. The entity picked at each level by the
   beam search is scored too (``pick_acc_<level>``), against the truth's composite keys.

With ``out_dir``: predictions.parquet, metrics.json, skipped.csv, error_map.png, error_cdf.png.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from flows.report.charts import error_cdf
from flows.report.maps import error_map
from flows.report.scoring import score_points
from geodata.atomic import write_parquet_atomic, write_text_atomic
from geodata.eval_sets.benchmark_csv import INCLUSIVE_BY_FORMAT
from geodata.eval_sets.photos import decoded_batches, find_benchmark_images
from geodata.eval_sets.truth import Truth, read_truth
from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS
from geodata.labels.hierarchy import level_keys
from geodata.osv5m import LABEL_COLUMNS, LEVELS, UNIQUE_COLUMNS
from hierloc.geometry.geo import geoscore
from hierloc.infer.predictor import Predictor

log = logging.getLogger(__name__)

#: How many examples of skipped rows the result (and metrics.json) lists; skipped.csv has all.
SHOW_SKIPPED = 20
SKIPPED_COLUMNS: tuple[str, ...] = ("kind", "id", "image", "line", "field", "reason", "value")


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


def _rows_with_images(
    rows: pd.DataFrame, images_dir: Path
) -> tuple[pd.DataFrame, list[Path], list[tuple[str, str]]]:
    """The truth rows whose image is found under ``images_dir``, their image paths, and the
    (id, image) of the others (logged)."""
    found, _ = find_benchmark_images(images_dir, rows["image"].tolist())
    has_image = rows["image"].isin(list(found)).to_numpy()
    missing = list(zip(rows.loc[~has_image, "id"], rows.loc[~has_image, "image"]))
    if missing:
        log.warning("%d of %d benchmark image(s) not found under %s, e.g. %s", len(missing), len(rows), images_dir,
                    ", ".join(im for _, im in missing[:5]))
    rows = rows[has_image].reset_index(drop=True)
    return rows, [found[name] for name in rows["image"]], missing


@dataclass
class _Predictions:
    """Per row (N,): the predicted point, the entity picked at each level (key, name, probability),
    whether the photo was answered; the (id, image, error) of photos that did not decode."""

    lat: np.ndarray
    lon: np.ndarray
    picks: dict[str, np.ndarray]
    pick_names: dict[str, np.ndarray]
    pick_probs: dict[str, np.ndarray]
    answered: np.ndarray
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)
    search_seconds: float = 0.0

    @classmethod
    def empty(cls, n: int) -> _Predictions:
        return cls(np.full(n, np.nan), np.full(n, np.nan), {lvl: np.full(n, "", dtype=object) for lvl in LEVELS},
                   {lvl: np.full(n, "", dtype=object) for lvl in LEVELS}, {lvl: np.full(n, np.nan) for lvl in LEVELS},
                   np.zeros(n, dtype=bool))


def _predict(predictor: Predictor, rows: pd.DataFrame, paths: Sequence[Path], *, batch_size: int, beam_k: int,
             max_image_pixels: int, progress: Callable[[int, int, float], None] | None, t_start: float) -> _Predictions:
    """Decode the photos in batches (as the model's features were: ``Predictor.decode_min_side``) and run
    the backbone and the beam search on those that decode."""
    n = len(rows)
    out = _Predictions.empty(n)
    done = 0
    for batch in decoded_batches(paths, batch_size, max_image_pixels, min_side=predictor.decode_min_side):
        good = [(i, im) for i, im, err in batch if im is not None]
        out.unreadable += [(rows.at[i, "id"], rows.at[i, "image"], err) for i, im, err in batch if im is None]
        if good:
            feats = predictor.image_features([im for _, im in good], batch_size=batch_size)
            t0 = time.perf_counter()
            preds = predictor.predict_features(feats, top_k=1, beam_k=beam_k)
            out.search_seconds += time.perf_counter() - t0
            for (i, _), p in zip(good, preds):
                out.lat[i], out.lon[i] = p.latitude, p.longitude
                for lvl in LEVELS:
                    out.picks[lvl][i] = p.levels[lvl]["key"]
                    out.pick_names[lvl][i] = p.levels[lvl]["name"]
                    out.pick_probs[lvl][i] = p.levels[lvl]["prob"]
                out.answered[i] = True
        done += len(batch)
        if progress is not None:
            progress(done, n, time.perf_counter() - t_start)
    if out.unreadable:
        log.warning("%d benchmark image(s) could not be decoded, e.g. %s: %s", len(out.unreadable),
                    out.unreadable[0][1], out.unreadable[0][2])
    return out


def _write_outputs(out_dir: Path, result: dict, frame: pd.DataFrame, skipped: pd.DataFrame, ev: pd.DataFrame,
                   p_lat: np.ndarray, p_lon: np.ndarray, dist_km: np.ndarray, meta_csv: Path) -> None:
    """predictions.parquet (``frame``), skipped.csv, the error map and CDF, and metrics.json
    (``result`` with its "files" added) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"predictions": out_dir / "predictions.parquet", "metrics": out_dir / "metrics.json",
             "skipped": out_dir / "skipped.csv", "error_map": out_dir / "error_map.png",
             "error_cdf": out_dir / "error_cdf.png"}
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), files["predictions"])
    write_text_atomic(skipped.to_csv(index=False, lineterminator="\n"), files["skipped"])
    error_map(ev["latitude"], ev["longitude"], p_lat, p_lon, files["error_map"],
              title=f"{meta_csv.name}: {len(ev)} photos, median error {np.median(dist_km):.0f} km")
    error_cdf(dist_km, files["error_cdf"])
    result["files"] = {k: str(v) for k, v in files.items()}
    write_text_atomic(json.dumps(_json_safe(result), indent=2), files["metrics"])


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
    backbone. fmt: one of geodata.eval_sets.truth.EVAL_FORMATS. inclusive: None = the benchmark's own rule
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

    rows, paths, missing = _rows_with_images(truth.rows, images_dir)
    predictor = bundle_or_predictor if isinstance(bundle_or_predictor, Predictor) else Predictor.load(
        Path(bundle_or_predictor), device=device)
    pred = _predict(predictor, rows, paths, batch_size=batch_size, beam_k=beam_k, max_image_pixels=max_image_pixels,
                    progress=progress, t_start=t_start)
    unreadable = pred.unreadable

    ok = pred.answered  # rows whose photo was found and decoded
    n_eval = int(ok.sum())
    if n_eval == 0:
        raise ValueError(
            f"no benchmark row could be evaluated: {len(truth.rows)} row(s) read from {meta_csv}, "
            f"{len(missing)} image(s) missing under {images_dir}, {len(unreadable)} unreadable, "
            f"{n_quarantined} row(s) quarantined; check --images (images are matched by the file's "
            f"image/id column{', as <id>.jpg' if fmt == 'osv5m' else ''})")
    ev = rows[ok].reset_index(drop=True)
    p_lat, p_lon = pred.lat[ok], pred.lon[ok]
    metrics, dist_km, hits = score_points(p_lat, p_lon, ev["latitude"].to_numpy(np.float64),
                                          ev["longitude"].to_numpy(np.float64), ev[list(UNIQUE_COLUMNS)],
                                          variant=variant, inclusive=inclusive)
    truth_keys = level_keys(ev[list(LABEL_COLUMNS)])
    pick_hits = {lvl: pred.picks[lvl][ok] == truth_keys[lvl].to_numpy(dtype=object) for lvl in LEVELS}
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
        "search_ms_per_image": 1000.0 * pred.search_seconds / n_eval,
        "seconds": time.perf_counter() - t_start,
    }
    if out_dir is not None:
        frame = pd.DataFrame({
            "id": ev["id"], "image": ev["image"],
            "true_latitude": ev["latitude"], "true_longitude": ev["longitude"],
            "latitude": p_lat, "longitude": p_lon, "dist_km": dist_km, "geoscore": geoscore(dist_km),
            **{f"pick_{lvl}": pred.picks[lvl][ok] for lvl in LEVELS},
            **{f"pick_{lvl}_name": pred.pick_names[lvl][ok] for lvl in LEVELS},
            **{f"pick_{lvl}_prob": pred.pick_probs[lvl][ok] for lvl in LEVELS},
            **{f"pick_hit_{lvl}": pick_hits[lvl].astype(bool) for lvl in LEVELS},
            **{f"hit_{lvl}": np.asarray(v, dtype=bool) for lvl, v in hits.items()},
        })
        _write_outputs(Path(out_dir), result, frame, skipped, ev, p_lat, p_lon, dist_km, meta_csv)
    return _json_safe(result)
