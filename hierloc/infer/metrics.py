"""OSV-5M benchmark metrics, exactly as the official code computes them (HIERLOC.md section 10).

Source of truth: gastruc/osv5m ``metrics/utils.py`` and ``metrics/distance_based.py``.
Distances come from hierloc.geometry.geo.haversine_km; level keys compare the reverse-geocoded
prediction (GeoNames cc, admin1, admin2, name) with the ground-truth unique_* keys.

Two variants of the per-level accuracies:

- ``"official"`` (default, comparable with published numbers). A missing ground-truth key
  becomes the string "NaN", as the official loader writes it; so does a key that pandas' default
  NA parsing reads as missing (``PANDAS_DEFAULT_NA``: the official loader reads test.csv with it),
  which hits Namibia: its country code "NA" becomes "NaN" and a Namibian row never scores a
  country hit (its region "..._NA" and finer keys are untouched). The official mask drops rows
  whose key is "nan" (lower case), which never occurs, so every row counts in every
  denominator; and where admin2 is missing the truth holds "NaN" (sub-region) or
  "name_NaN_admin1_cc" (city) while the prediction holds "_admin1_cc" / "name__admin1_cc",
  so such rows can never score a sub-region or city hit.
- ``"corrected"``: a missing admin2 is written the same on both sides (the truth's
  "name_NaN_admin1_cc" becomes "name__admin1_cc", the predicted form), and acc_subregion is
  over the rows that have a ground-truth sub-region only (others are left out of its
  numerator and denominator). Country, region and city stay over all rows. Namibia's "NA" is
  its country code.

Both variants sum in float64 and our haversine clips its argument, where the official code
keeps float32 running sums (its totals differ from ours in the 5th significant digit on
hundreds of thousands of rows) and returns NaN for exact antipodes (ours: pi * R). Per-row
distances, scores and hits agree.

Numpy only (torch is not imported). Key arrays are 1-D numpy object arrays of str.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hierloc.geometry.geo import geoscore

#: Hierarchy levels, coarse to fine. Same names and order as geodata.osv5m.LEVELS, which
#: hierloc cannot import (layering: hierloc never imports geodata).
METRIC_LEVELS: tuple[str, ...] = ("country", "region", "subregion", "city")

#: Radii of the distance accuracies (km): acc_1km ... acc_2500km.
RADII_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)

VARIANTS: tuple[str, ...] = ("official", "corrected")

#: What the official loader writes for a missing unique_* value (and inside unique_city).
OFFICIAL_MISSING = "NaN"
#: What the official mask tests for (never matches OFFICIAL_MISSING: the quirk).
OFFICIAL_MASK_VALUE = "nan"
#: The strings pandas' default NA parsing reads as missing (pandas._libs.parsers.STR_NA_VALUES;
#: a test checks the copy): the official loader's truth holds "NaN" where test.csv holds one.
PANDAS_DEFAULT_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
#: Missing sub-region markers recognised by the corrected variant.
_MISSING_STRINGS = frozenset({"", "NaN", "nan"})

Keys = dict[str, np.ndarray]


def _is_missing(value: Any) -> bool:
    """None, float NaN, pandas.NA or "" (strings other than "" are never missing here)."""
    if isinstance(value, str):
        return value == ""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN is the only value unequal to itself
    except TypeError:  # pandas.NA: its truth value is ambiguous; it is a missing marker
        return True


def _strings(values: Sequence[Any] | np.ndarray, missing: str) -> np.ndarray:
    """(N,) values -> (N,) object array of str, missing values replaced by ``missing``."""
    arr = np.asarray(values, dtype=object).ravel()
    return np.array([missing if _is_missing(v) else str(v) for v in arr], dtype=object)


def predicted_keys(
    cc: Sequence[str] | np.ndarray,
    admin1: Sequence[str] | np.ndarray,
    admin2: Sequence[str] | np.ndarray,
    name: Sequence[str] | np.ndarray,
) -> Keys:
    """Level keys of reverse-geocoded predictions, built as the official code builds them.

    (N,) x 4 GeoNames fields ("" or None when missing) -> {level: (N,) object array}:
    country = cc, region = admin1_cc, subregion = admin2_admin1_cc,
    city = name_admin2_admin1_cc; an empty admin2 stays "" ("_admin1_cc", "name__admin1_cc").
    """
    cc_s, a1, a2, nm = (_strings(x, "") for x in (cc, admin1, admin2, name))
    if not len(cc_s) == len(a1) == len(a2) == len(nm):
        raise ValueError(
            f"predicted_keys: lengths differ: cc {len(cc_s)}, admin1 {len(a1)}, "
            f"admin2 {len(a2)}, name {len(nm)}"
        )
    region = a1 + "_" + cc_s
    subregion = a2 + "_" + region
    return {"country": cc_s, "region": region, "subregion": subregion, "city": nm + "_" + subregion}


def _normalise_truth(keys: Mapping[str, np.ndarray], variant: str) -> Keys:
    """Put truth keys in the form of ``variant``; idempotent, and either form is accepted.

    official: missing -> "NaN"; a city written "name__region" for a row without
    sub-region goes back to "name_NaN_region".
    corrected: a missing sub-region ("", "NaN", "nan", None, NaN) -> ""; its city
    "name_NaN_region" (or "_nan_") -> "name__region"; other missing keys -> "".
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    missing = OFFICIAL_MISSING if variant == "official" else ""
    country, region, subregion, city = (_strings(keys[level], missing) for level in METRIC_LEVELS)
    if not len(country) == len(region) == len(subregion) == len(city):
        raise ValueError(
            f"truth keys: lengths differ: country {len(country)}, region {len(region)}, "
            f"subregion {len(subregion)}, city {len(city)}"
        )
    no_sub = np.array([s in _MISSING_STRINGS for s in subregion], dtype=bool)
    if variant == "official":
        tokens = ("",)  # the corrected city form: name + "_" + "" + "_" + region
        new_token = OFFICIAL_MISSING
    else:
        subregion[no_sub] = ""
        tokens = (OFFICIAL_MISSING, "nan")
        new_token = ""
    for i in np.flatnonzero(no_sub):
        for token in tokens:
            suffix = "_" + token + "_" + region[i]
            if city[i].endswith(suffix):
                city[i] = city[i][: -len(suffix)] + "_" + new_token + "_" + region[i]
                break
    return {"country": country, "region": region, "subregion": subregion, "city": city}


def truth_keys(
    unique_country: Sequence[Any] | np.ndarray,
    unique_region: Sequence[Any] | np.ndarray,
    unique_subregion: Sequence[Any] | np.ndarray,
    unique_city: Sequence[Any] | np.ndarray,
    variant: str = "official",
) -> Keys:
    """Ground-truth level keys from the OSV-5M unique_* columns: (N,) x 4 -> {level: (N,)}.

    official: missing values (None, NaN, pandas.NA, "") and the strings pandas reads as NA
    (Namibia's "NA") become "NaN" like the official loader. corrected: a missing sub-region becomes "" and its unique_city
    "name_NaN_admin1_cc" becomes "name__admin1_cc" (the predicted form); see module doc.
    """
    raw = dict(zip(METRIC_LEVELS, (unique_country, unique_region, unique_subregion, unique_city)))
    if variant == "official":  # the official loader's NA parsing of test.csv, on every unique_* column
        raw = {lv: _strings(v, "") for lv, v in raw.items()}
        for arr in raw.values():
            arr[np.array([v in PANDAS_DEFAULT_NA for v in arr], dtype=bool)] = OFFICIAL_MISSING
    return _normalise_truth(raw, variant)


def per_row_hits(
    pred_keys: Mapping[str, np.ndarray], true_keys: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-row key equality for each level in both dicts: {level: (N,) bool}.

    The keys are compared as given: build true_keys with truth_keys(..., variant).
    """
    hits = {}
    for level in METRIC_LEVELS:
        if level in pred_keys and level in true_keys:
            pred = np.asarray(pred_keys[level], dtype=object).ravel()
            true = np.asarray(true_keys[level], dtype=object).ravel()
            if pred.shape != true.shape:
                raise ValueError(
                    f"level {level!r}: {pred.shape[0]} predictions vs {true.shape[0]} truths"
                )
            hits[level] = (pred == true).astype(bool)
    return hits


def osv5m_metrics(
    dist_km: np.ndarray,
    pred_keys: Mapping[str, np.ndarray],
    true_keys: Mapping[str, np.ndarray],
    variant: str = "official",
    inclusive: bool = False,
) -> dict[str, float]:
    """OSV-5M benchmark metrics of N predictions.

    dist_km: (N,) haversine errors (hierloc.geometry.geo.haversine_km). pred_keys: predicted_keys(...);
    true_keys: truth_keys(...) (re-normalised here to ``variant``, so either form works).
    inclusive: acc_<r>km counts d <= r (Im2GPS-style) instead of the official d < r.

    Returns, in this order: geoscore (mean, in (0, 5000]), mean_km, median_km,
    acc_country, acc_region, acc_subregion, acc_city, acc_1km, acc_25km, acc_200km,
    acc_750km, acc_2500km (fractions in [0, 1]), n (int). A level whose denominator is
    empty (corrected acc_subregion with no ground-truth sub-region) is NaN.
    """
    d = np.asarray(dist_km, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("osv5m_metrics: no predictions (dist_km is empty)")
    if not np.isfinite(d).all():
        bad = np.flatnonzero(~np.isfinite(d))
        raise ValueError(f"osv5m_metrics: dist_km has non-finite values at rows {bad[:5].tolist()}")
    missing = [lv for lv in METRIC_LEVELS if lv not in pred_keys or lv not in true_keys]
    if missing:
        raise ValueError(f"osv5m_metrics: levels {missing} missing from pred_keys or true_keys")
    truth = _normalise_truth(true_keys, variant)
    hits = per_row_hits(pred_keys, truth)

    out: dict[str, float] = {
        "geoscore": float(np.mean(geoscore(d))),
        "mean_km": float(np.mean(d)),
        "median_km": float(np.median(d)),
    }
    for level in METRIC_LEVELS:
        if hits[level].shape != d.shape:
            raise ValueError(
                f"level {level!r}: {hits[level].shape[0]} keys vs {d.shape[0]} distances"
            )
        if variant == "official":
            counted = truth[level] != OFFICIAL_MASK_VALUE  # the official mask: all True in practice
        elif level == "subregion":
            counted = truth[level] != ""  # rows with a ground-truth sub-region
        else:
            counted = np.ones(d.shape, dtype=bool)
        counted = np.asarray(counted, dtype=bool)
        out[f"acc_{level}"] = float(hits[level][counted].mean()) if counted.any() else float("nan")
    for r in RADII_KM:
        within = d <= r if inclusive else d < r  # official OSV-5M: strict
        out[f"acc_{r}km"] = float(within.mean())
    out["n"] = int(d.size)
    return out


def expected_calibration_error(prob: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by
    the share of predictions in each bin. prob (B,) in [0, 1], correct (B,) bool."""
    prob = np.asarray(prob, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if prob.shape != correct.shape:
        raise ValueError(f"prob {prob.shape} and correct {correct.shape} differ in shape")
    if len(prob) == 0:
        return float("nan")
    # Bin i holds (i/n, (i+1)/n]; a probability of exactly 0 goes to the first bin.
    bins = np.clip(np.ceil(prob * n_bins).astype(int) - 1, 0, n_bins - 1)
    conf = np.bincount(bins, weights=prob, minlength=n_bins)
    acc = np.bincount(bins, weights=correct.astype(float), minlength=n_bins)
    return float(np.abs(acc - conf).sum() / len(prob))
