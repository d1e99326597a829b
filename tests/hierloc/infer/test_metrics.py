"""hierloc.infer.metrics: OSV-5M metrics, official quirks, corrected variant, real sample rows."""

from __future__ import annotations

from pathlib import Path

import os
import numpy as np
import pandas as pd
import pytest

from hierloc.geometry.geo import geoscore, haversine_km
from hierloc.infer.metrics import (
    METRIC_LEVELS,
    RADII_KM,
    osv5m_metrics,
    per_row_hits,
    predicted_keys,
    truth_keys,
)

SELECT_CSV = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "select.csv"
METRIC_NAMES = [
    "geoscore", "mean_km", "median_km",
    "acc_country", "acc_region", "acc_subregion", "acc_city",
    "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "n",
]


@pytest.fixture(scope="module")
def select() -> pd.DataFrame:
    return pd.read_csv(SELECT_CSV, dtype=str, keep_default_na=False, na_filter=False)


def _release_unique(cc, admin1, admin2, name) -> list[np.ndarray]:
    """The release's unique_* columns as its loader hands them over: missing sub-region = NaN.

    Written out here because hierloc (and its tests) do not import geodata.
    """
    cc, admin1, admin2, name = (np.asarray(x, dtype=object) for x in (cc, admin1, admin2, name))
    region = admin1 + "_" + cc
    has_sub = admin2 != ""
    sub = np.where(has_sub, admin2 + "_" + region, np.nan)
    city = name + "_" + np.where(has_sub, admin2, "NaN") + "_" + region
    return [cc, region, sub, city]


def test_predicted_keys_as_official_code_builds_them():
    keys = predicted_keys(["CN", "NA"], ["Henan Sheng", "Khomas"], ["", "Windhoek West"], ["Puyang", "Windhoek"])
    assert keys["country"].tolist() == ["CN", "NA"]
    assert keys["region"].tolist() == ["Henan Sheng_CN", "Khomas_NA"]
    assert keys["subregion"].tolist() == ["_Henan Sheng_CN", "Windhoek West_Khomas_NA"]
    assert keys["city"].tolist() == ["Puyang__Henan Sheng_CN", "Windhoek_Windhoek West_Khomas_NA"]
    with pytest.raises(ValueError, match="lengths differ"):
        predicted_keys(["CN"], ["a", "b"], ["", ""], ["x", "y"])


def test_truth_keys_official_and_corrected():
    args = (["CN", "CN", "NA"], ["H_CN", "H_CN", "K_NA"], [None, float("nan"), "W_K_NA"],
            ["P_NaN_H_CN", "Q_NaN_H_CN", "X_W_K_NA"])
    off = truth_keys(*args)
    assert off["subregion"].tolist() == ["NaN", "NaN", "W_K_NA"]
    assert off["city"].tolist() == ["P_NaN_H_CN", "Q_NaN_H_CN", "X_W_K_NA"]
    cor = truth_keys(*args, variant="corrected")
    assert cor["subregion"].tolist() == ["", "", "W_K_NA"]
    assert cor["city"].tolist() == ["P__H_CN", "Q__H_CN", "X_W_K_NA"]
    # each variant's form converts to the other's and back
    assert truth_keys(*(cor[lv] for lv in METRIC_LEVELS))["city"].tolist() == off["city"].tolist()
    assert truth_keys(*(off[lv] for lv in METRIC_LEVELS), variant="corrected")["city"].tolist() == cor["city"].tolist()
    assert truth_keys(["CN"], [""], [""], ["P_NaN__CN"])["region"].tolist() == ["NaN"]
    with pytest.raises(ValueError, match="variant"):
        truth_keys(*args, variant="fixed")


def test_metric_names_and_ranges():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 5000, 40)
    keys = predicted_keys(["FR"] * 40, ["IDF"] * 40, ["Paris"] * 40, ["Paris"] * 40)
    out = osv5m_metrics(d, keys, truth_keys(*(keys[lv] for lv in METRIC_LEVELS)))
    assert list(out) == METRIC_NAMES
    assert out["n"] == 40
    assert all(0.0 <= out[k] <= 1.0 for k in METRIC_NAMES if k.startswith("acc_"))
    assert out["geoscore"] == pytest.approx(geoscore(d).mean())
    assert out["median_km"] == pytest.approx(np.median(d)) and out["mean_km"] == pytest.approx(d.mean())
    assert [out[f"acc_{r}km"] for r in RADII_KM] == pytest.approx([(d < r).mean() for r in RADII_KM])
    assert out["acc_country"] == out["acc_city"] == 1.0


def test_strict_versus_inclusive_radius():
    d = np.array([0.5, 1.0, 25.0, 199.0, 750.0, 2500.0, 3000.0])
    keys = predicted_keys(["FR"] * 7, ["a"] * 7, ["b"] * 7, ["c"] * 7)
    truth = truth_keys(*(keys[lv] for lv in METRIC_LEVELS))
    strict = osv5m_metrics(d, keys, truth)
    inclusive = osv5m_metrics(d, keys, truth, inclusive=True)
    assert [strict[f"acc_{r}km"] * 7 for r in RADII_KM] == pytest.approx([1, 2, 4, 4, 5])
    assert [inclusive[f"acc_{r}km"] * 7 for r in RADII_KM] == pytest.approx([2, 3, 4, 5, 6])


def test_official_quirk_rows_without_subregion_never_hit():
    # the prediction is the very GeoNames place of the truth; row 0 has no admin2
    pred = predicted_keys(["CN", "IT"], ["Henan Sheng", "Sardinia"], ["", "Medio Campidano"], ["Puyang", "Sanluri"])
    unique = _release_unique(["CN", "IT"], ["Henan Sheng", "Sardinia"], ["", "Medio Campidano"], ["Puyang", "Sanluri"])
    d = np.zeros(2)
    official = osv5m_metrics(d, pred, truth_keys(*unique))
    assert (official["acc_country"], official["acc_region"]) == (1.0, 1.0)
    assert (official["acc_subregion"], official["acc_city"]) == (0.5, 0.5)  # denominators hold both rows
    corrected = osv5m_metrics(d, pred, truth_keys(*unique, variant="corrected"), variant="corrected")
    assert corrected["acc_subregion"] == 1.0  # over the one row that has a sub-region
    assert corrected["acc_city"] == 1.0
    hits = per_row_hits(pred, truth_keys(*unique))
    assert hits["subregion"].tolist() == [False, True] and hits["city"].tolist() == [False, True]
    # metrics re-normalise the truth, so mixing forms does not change the answer
    assert osv5m_metrics(d, pred, truth_keys(*unique, variant="corrected")) == official
    assert osv5m_metrics(d, pred, truth_keys(*unique), variant="corrected") == corrected


def test_corrected_subregion_is_nan_without_any_truth_subregion():
    pred = predicted_keys(["CN"], ["H"], [""], ["P"])
    out = osv5m_metrics(np.zeros(1), pred, truth_keys(*_release_unique(["CN"], ["H"], [""], ["P"])), variant="corrected")
    assert np.isnan(out["acc_subregion"]) and out["acc_city"] == 1.0


def test_official_mask_drops_lowercase_nan_like_the_official_code():
    pred = predicted_keys(["CN", "CN"], ["H", "H"], ["S", "S"], ["P", "P"])
    # Keys as given to the metric (truth_keys would read a "nan" cell as the official loader
    # does: NA, written "NaN", which the mask never drops).
    truth = {"country": np.array(["CN", "CN"], object), "region": np.array(["H_CN", "H_CN"], object),
             "subregion": np.array(["nan", "S_H_CN"], object), "city": np.array(["P_S_H_CN", "P_S_H_CN"], object)}
    assert osv5m_metrics(np.zeros(2), pred, truth)["acc_subregion"] == 1.0  # row 0 masked out


def test_errors():
    keys = predicted_keys(["FR"], ["a"], ["b"], ["c"])
    truth = truth_keys(*(keys[lv] for lv in METRIC_LEVELS))
    with pytest.raises(ValueError, match="empty"):
        osv5m_metrics(np.array([]), keys, truth)
    with pytest.raises(ValueError, match="non-finite"):
        osv5m_metrics(np.array([np.nan]), keys, truth)
    with pytest.raises(ValueError, match="predictions vs"):
        osv5m_metrics(np.zeros(1), predicted_keys(["FR"] * 2, ["a"] * 2, ["b"] * 2, ["c"] * 2), truth)
    with pytest.raises(ValueError, match="missing"):
        osv5m_metrics(np.zeros(1), {"country": keys["country"]}, truth)


def test_select_csv_baseline_hits_and_metrics(select):
    """The sample's own labels of the baseline's predicted point give its published hits."""
    pred = predicted_keys(*(select[f"pred_{c}_base"] for c in ("country", "region", "area", "city")))
    truth = truth_keys(*_release_unique(*(select[c] for c in ("country", "region", "area", "city"))))
    hits = per_row_hits(pred, truth)
    assert hits["country"].tolist() == (select["country_hit_base"] == "True").tolist()
    assert hits["region"].tolist() == (select["region_hit_base"] == "True").tolist()
    d = haversine_km(*(select[c].astype(float).to_numpy() for c in ("pred_lat_base", "pred_lon_base", "true_lat", "true_lon")))
    out = osv5m_metrics(d, pred, truth)
    assert out["acc_country"] == pytest.approx((select["country_hit_base"] == "True").mean())
    assert out["geoscore"] == pytest.approx(select["score_base"].astype(float).mean(), abs=1e-6)
    assert out["mean_km"] == pytest.approx(select["distance_base"].astype(float).mean(), abs=1e-6)
    # city hits need admin2 equality too: the official count is never above the name-only one
    assert hits["city"].sum() <= (select["city_hit_base"] == "True").sum()


def test_expected_calibration_error():
    from hierloc.infer.metrics import expected_calibration_error

    # Perfectly calibrated bins: p = 0.25 right 1 in 4, p = 1.0 always right.
    p = np.array([0.25] * 4 + [1.0] * 3)
    ok = np.array([1, 0, 0, 0, 1, 1, 1], dtype=bool)
    assert expected_calibration_error(p, ok) == pytest.approx(0.0)
    # Always 0.9 confident, right half the time: off by 0.4.
    assert expected_calibration_error(np.full(10, 0.9), np.arange(10) % 2 == 0) == pytest.approx(0.4)
    assert np.isnan(expected_calibration_error(np.zeros(0), np.zeros(0, bool)))
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(np.zeros(3), np.zeros(2, bool))
