"""Score predictions against OSV-5M ground truth: points (``score_points``, the evaluate stage
and benchmarks), a prediction CSV (the CLI ``hierloc metrics PRED_CSV --truth TRUTH_CSV``),
and the entity picked at each level (``pick_metrics``).
Wires geodata (CSV reading, GeoNames reverse geocoding, unique keys) to hierloc's
haversine and OSV-5M metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from geodata.atomic import atomic_write_path
from geodata.labels.coordinates import parse_coordinates
from geodata.labels.geonames import GeoNamesLabeler, default_labeler
from geodata.osv5m import LABEL_COLUMNS, LEVELS, UNIQUE_COLUMNS, unique_keys
from hierloc.geometry.geo import geoscore, haversine_km
from hierloc.infer.metrics import (
    METRIC_LEVELS,
    RADII_KM,
    expected_calibration_error,
    osv5m_metrics,
    per_row_hits,
    predicted_keys,
    truth_keys,
)

PRED_COLUMNS: tuple[str, ...] = ("id", "latitude", "longitude")
_SHOW_IDS = 5


def _read_strings(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """All columns as str, NA parsing off (ids stay exact, Namibia stays "NA")."""
    try:
        frame = pd.read_csv(
            path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8"
        )
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: empty file, expected a CSV header with {list(required)}"
        ) from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}, line 1: missing column(s) {missing}; columns are {list(frame.columns)}"
        )
    repeat = frame["id"].duplicated(keep="first")
    if repeat.any():
        row = int(np.flatnonzero(repeat.to_numpy())[0])
        first = int(np.flatnonzero((frame["id"] == frame["id"].iloc[row]).to_numpy())[0])
        raise ValueError(
            f"{path}, line {row + 2}: id {frame['id'].iloc[row]!r} appears more than once "
            f"(first at line {first + 2}; {int(frame['id'][repeat].nunique())} duplicated id(s))"
        )
    return frame


#: The sample's select.csv (the OSV-5M authors' evaluation dump) names the truth columns differently.
_SELECT_CSV_NAMES = {"true_lat": "latitude", "true_lon": "longitude", "area": "sub-region"}


def _read_truth(path: Path) -> pd.DataFrame:
    """A truth CSV: OSV-5M test.csv (id, latitude, longitude, unique_* or raw labels), or a
    select.csv (id, true_lat, true_lon, country, region, area, city), as test.csv's names."""
    frame = _read_strings(path, ("id",))
    if "latitude" not in frame.columns and {"true_lat", "true_lon"} <= set(frame.columns):
        frame = frame.rename(columns={k: v for k, v in _SELECT_CSV_NAMES.items() if v not in frame.columns})
    missing = [c for c in PRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}, line 1: missing column(s) {missing} (or true_lat, true_lon as in select.csv); "
                         f"columns are {list(frame.columns)}")
    return frame


def _truth_unique(truth: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The four unique_* columns of a truth frame, built from raw labels if absent."""
    if all(c in truth.columns for c in UNIQUE_COLUMNS):
        return truth.loc[:, list(UNIQUE_COLUMNS)]
    if all(c in truth.columns for c in LABEL_COLUMNS):
        return unique_keys(*(truth[c] for c in LABEL_COLUMNS))
    raise ValueError(
        f"{path}, line 1: needs either columns {list(UNIQUE_COLUMNS)} or {list(LABEL_COLUMNS)}; "
        f"columns are {list(truth.columns)}"
    )


def _check_same_ids(
    pred_ids: pd.Series, truth_ids: pd.Series, pred_csv: Path, truth_csv: Path
) -> None:
    """Both files must hold the same id set; the error counts and shows the strays."""
    pairs = ((pred_ids, truth_ids, pred_csv, truth_csv), (truth_ids, pred_ids, truth_csv, pred_csv))
    for ids, other, a, b in pairs:
        absent = ids[~ids.isin(other)]
        if len(absent):
            raise ValueError(
                f"{len(absent)} id(s) of {a} are not in {b}, e.g. {absent.head(_SHOW_IDS).tolist()}"
            )


def score_points(
    pred_lat: np.ndarray,
    pred_lon: np.ndarray,
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    unique: pd.DataFrame,
    variant: str = "official",
    inclusive: bool = False,
    labeler: GeoNamesLabeler | None = None,
) -> tuple[dict[str, float], np.ndarray, dict[str, np.ndarray]]:
    """OSV-5M metrics of predicted points against the truth, the official way.

    (N,) degrees x 4 and the truth's UNIQUE_COLUMNS (N rows, aligned) -> (metrics,
    dist_km (N,), per-level hits {level: (N,) bool}). Predictions are reverse-geocoded
    with GeoNames cities1000, as the official code does.
    """
    dist_km = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    labels = (labeler or default_labeler()).label(pred_lat, pred_lon)
    pred_keys = predicted_keys(labels["cc"], labels["admin1"], labels["admin2"], labels["name"])
    true_keys = truth_keys(
        *(unique[c].to_numpy(dtype=object) for c in UNIQUE_COLUMNS), variant=variant
    )
    metrics = osv5m_metrics(dist_km, pred_keys, true_keys, variant=variant, inclusive=inclusive)
    return metrics, dist_km, per_row_hits(pred_keys, true_keys)


def pick_metrics(level_index: np.ndarray, picks: np.ndarray, pick_prob: np.ndarray,
                 targets: np.ndarray) -> dict[str, float]:
    """How right the entity picked at each level is, and how calibrated its probability.

    level_index: (E,) each entity row's index within its level; picks (N, L) entity rows
    picked by the beam search, pick_prob (N, L) their probabilities; targets (N, L) the true
    index within each level (-1: none). -> pick_acc_<level>, ece_<level> and
    mean_prob_<level> (NaN without rows).
    """
    metrics: dict[str, float] = {}
    for lvl, name in enumerate(LEVELS):
        picked_ok = level_index[picks[:, lvl]] == targets[:, lvl]
        metrics[f"pick_acc_{name}"] = float(picked_ok.mean()) if len(targets) else float("nan")
        # Are the beam probabilities calibrated? 0 = a picked entity with probability p is right a share p of the time.
        metrics[f"ece_{name}"] = expected_calibration_error(pick_prob[:, lvl], picked_ok)
        metrics[f"mean_prob_{name}"] = float(pick_prob[:, lvl].mean()) if len(targets) else float("nan")
    return metrics

def score_prediction_csv(
    pred_csv: str | Path,
    truth_csv: str | Path,
    variant: str = "official",
    inclusive: bool = False,
    per_row_out: str | Path | None = None,
    labeler: GeoNamesLabeler | None = None,
) -> dict[str, float]:
    """OSV-5M metrics of a prediction CSV (see hierloc.infer.metrics.osv5m_metrics for the names).

    pred_csv: columns id, latitude, longitude (degrees). truth_csv: OSV-5M test.csv format with
    id, latitude, longitude and either the unique_* columns or raw country, region, sub-region,
    city; or the sample's select.csv (true_lat, true_lon, area for the sub-region). Ids are compared as exact strings; both files must hold the same set of ids.
    Predictions are reverse-geocoded with GeoNames cities1000 (as the official code).
    per_row_out: optional CSV (id, dist_km, geoscore, hit_country, hit_region,
    hit_subregion, hit_city), rows in prediction order, written atomically.
    """
    pred_csv, truth_csv = Path(pred_csv), Path(truth_csv)
    pred = _read_strings(pred_csv, PRED_COLUMNS)
    truth = _read_truth(truth_csv)
    _check_same_ids(pred["id"], truth["id"], pred_csv, truth_csv)
    pred_lat, pred_lon = parse_coordinates(pred, source=str(pred_csv), first_line=2)
    true_lat, true_lon = parse_coordinates(truth, source=str(truth_csv), first_line=2)
    unique = _truth_unique(truth, truth_csv)

    order = pd.Index(truth["id"]).get_indexer(pred["id"])  # truth row of each prediction
    true_lat, true_lon = true_lat[order], true_lon[order]
    unique = unique.iloc[order].reset_index(drop=True)

    metrics, dist_km, hits = score_points(
        pred_lat, pred_lon, true_lat, true_lon, unique, variant=variant, inclusive=inclusive, labeler=labeler
    )
    if per_row_out is not None:
        rows = pd.DataFrame(
            {"id": pred["id"].to_numpy(), "dist_km": dist_km, "geoscore": geoscore(dist_km)}
        )
        for level in METRIC_LEVELS:
            rows[f"hit_{level}"] = hits[level]
        with atomic_write_path(per_row_out) as tmp:
            rows.to_csv(tmp, index=False, lineterminator="\n")
    return metrics


def format_metrics_table(metrics: dict[str, float]) -> str:
    """Two-column text table of osv5m_metrics' output, one metric a line.

    Accuracies (acc_*) as % with 1 decimal, distances (*_km) with 1 decimal and "km",
    geoscore with 1 decimal, n as an integer; unknown entries as given, at the end.
    """
    order = [
        "geoscore", "mean_km", "median_km",
        *(f"acc_{lv}" for lv in METRIC_LEVELS), *(f"acc_{r}km" for r in RADII_KM), "n",
    ]
    names = [k for k in order if k in metrics] + [k for k in metrics if k not in order]
    width = max((len(k) for k in names), default=6)
    lines = [f"{'metric':<{width}}  {'value':>10}"]
    for name in names:
        value = metrics[name]
        if name.startswith("acc_"):
            text = "nan" if math.isnan(value) else f"{100 * value:.1f} %"
        elif name.endswith("_km"):
            text = f"{value:.1f} km"
        elif name == "geoscore":
            text = f"{value:.1f}"
        elif name == "n":
            text = f"{int(value)}"
        else:
            text = f"{value}"
        lines.append(f"{name:<{width}}  {text:>10}")
    return "\n".join(lines)
